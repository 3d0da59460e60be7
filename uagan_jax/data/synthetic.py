"""Synthetic BraTS-2021-layout brain tumour phantoms (numpy only).

`make_phantom` draws one case: four co-registered MRI contrasts (T1, T1ce, T2, FLAIR) of a
head with skull, cortex, white matter, CSF and ventricles, plus a glioma-like tumour (oedema,
enhancing rim, necrotic or solid core) and its BraTS label map (0 background, 1 necrosis /
non-enhancing core, 2 oedema, 4 enhancing tumour). `write_dataset` writes cases to disk in the
BraTS 2021 folder layout as gzipped NIfTI, byte-identical for the same seed, so the whole
pipeline (loading, training, evaluation) can be exercised without real patient data.

Every case draws from ``np.random.default_rng([seed, case_index])``, so case ``i`` is the same
whether 3 or 300 cases are written. Tissue contrasts follow real MRI qualitatively: CSF is dark
in T1 and FLAIR but bright in T2, oedema is bright in T2 and FLAIR, and the enhancing rim is
bright only in T1ce.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from uagan_jax.data import MODALITIES
from uagan_jax.errors import UserError

DEFAULT_SHAPE = (128, 128, 96)
# Voxel size (mm) `write_dataset` writes by default: BraTS's 1 mm, which the tests' tiny models
# assume. The phantom brain spans about 75% x 93% of X and Y, i.e. 72 x 89 voxels at a 96x96
# plane: at 1 mm a 7 cm brain, at DEMO_SPACING a real one's 144 x 178 mm (real: ~135 x 175 mm).
DEFAULT_SPACING = 1.0
# What ``uagan-jax synth`` writes and the ``:demo`` recipes train at (config.apply_demo_sizes).
DEMO_SPACING = 2.0
MIN_DIM = 32
CASE_PREFIX = "SynthBraTS"
# First line of README.txt; its presence marks a folder as ours, so it may be overwritten.
README_MARKER = "SynthBraTS: synthetic brain tumour phantoms in the BraTS 2021 layout"

# Tissue codes of the internal tissue map (`make_phantom(..., return_tissues=True)`).
TISSUES = (
    "background", "skull", "csf", "grey_matter", "white_matter", "necrosis", "oedema",
    "enhancing", "non_enhancing", "deep_grey",
)
(BACKGROUND, SKULL, CSF, GM, WM, NECROSIS, OEDEMA, ENHANCING, NON_ENHANCING,
 DEEP_GM) = range(len(TISSUES))

# BraTS label of each tissue code.
_TISSUE_TO_LABEL = np.array([0, 0, 0, 0, 0, 1, 2, 4, 1, 0], dtype=np.uint8)

# Relative mean intensity of each tissue (rows in TISSUES order) per modality (MODALITIES
# order: t1, t1ce, t2, flair). Qualitatively like real MRI: CSF dark in T1/FLAIR (FLAIR
# suppresses free water) but bright in T2; oedema bright in T2/FLAIR; the enhancing rim is
# bright only after contrast (T1ce); necrosis is dark in T1ce.
_MEANS = np.array([
    # t1    t1ce  t2    flair
    [0.00, 0.00, 0.00, 0.00],  # background
    [0.90, 0.90, 0.20, 0.20],  # skull
    [0.20, 0.20, 1.00, 0.10],  # csf
    [0.60, 0.60, 0.50, 0.55],  # grey matter
    [0.80, 0.80, 0.35, 0.40],  # white matter
    [0.30, 0.15, 0.90, 0.50],  # necrosis
    [0.50, 0.50, 0.85, 1.00],  # oedema
    [0.55, 1.10, 0.60, 0.70],  # enhancing
    [0.45, 0.50, 0.75, 0.80],  # non-enhancing solid core
    [0.70, 0.70, 0.42, 0.47],  # deep grey matter (between grey and white matter)
], dtype=np.float32)
assert _MEANS.shape == (len(TISSUES), len(MODALITIES))

# Relative amplitude of within-tissue texture: tumour tissue is more heterogeneous.
_TEXTURE = np.array([0.0, 0.05, 0.03, 0.04, 0.03, 0.10, 0.07, 0.08, 0.08, 0.03],
                    dtype=np.float32)

_INT_SCALE = 1000.0  # relative intensity 1.0 -> 1000 in the int16 images


def _check_shape(shape: Sequence[int]) -> tuple[int, int, int]:
  """Validates a volume shape.

  Args:
    shape: three positive integers (X, Y, Z).

  Returns:
    The shape as a tuple of Python ints.

  Raises:
    UserError: not three integers, or a dimension below `MIN_DIM`.
  """
  try:
    dims = tuple(shape)
  except TypeError:
    raise UserError(f"shape must be three integers (X, Y, Z), got {shape!r}") from None
  if len(dims) != 3 or not all(
      isinstance(d, (int, np.integer)) and not isinstance(d, bool) for d in dims):
    raise UserError(f"shape must be three integers (X, Y, Z), got {shape!r}")
  if min(dims) < MIN_DIM:
    raise UserError(f"every shape dimension must be at least {MIN_DIM}, got {dims}")
  return tuple(int(d) for d in dims)


def _check_nonneg_int(name: str, value: int) -> int:
  """Checks that `value` is a non-negative integer (numpy seeds must be)."""
  if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
    raise UserError(f"{name} must be a non-negative integer, got {value!r}")
  return int(value)


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int],
                  cells: Sequence[int]) -> np.ndarray:
  """Smooth Gaussian random field with unit standard deviation.

  A coarse grid of `cells` white-noise values is interpolated to `shape` with normalised
  Gaussian weights, one separable axis at a time, which is far cheaper than blurring a full
  resolution noise volume.

  Args:
    rng: random generator.
    shape: output shape (3 dims).
    cells: coarse grid size per axis; more cells means finer structure.

  Returns:
    C-contiguous float32 array of `shape`, mean 0, standard deviation 1.
  """
  weights = []
  for n, c in zip(shape, cells):
    spacing = n / c
    nodes = (np.arange(c, dtype=np.float32) + 0.5) * spacing - 0.5
    pos = np.arange(n, dtype=np.float32)
    w = np.exp(-0.5 * ((pos[:, None] - nodes[None, :]) / (0.6 * spacing))**2)
    # Normalising per output voxel keeps the field's variance even near the volume edges.
    weights.append(w / w.sum(axis=1, keepdims=True))
  coarse = rng.standard_normal(tuple(cells)).astype(np.float32)
  small = np.einsum("jb,abk->ajk", weights[1], np.einsum("kc,abc->abk", weights[2], coarse))
  # The full-size contraction last, as one matmul, so the result comes out C-contiguous.
  field = (weights[0] @ small.reshape(cells[0], -1)).reshape(tuple(shape))
  field -= field.mean()
  field /= max(float(field.std()), 1e-6)
  return field


def _blur(volume: np.ndarray, kernel: Sequence[float] = (1.0, 4.0, 1.0)) -> np.ndarray:
  """Separable 3-tap blur with edge replication (partial-volume mixing at tissue borders).

  Args:
    volume: 3-D float array.
    kernel: three weights, normalised here.

  Returns:
    Blurred array of the same shape and dtype (a new array).
  """
  k = [volume.dtype.type(w / sum(kernel)) for w in kernel]
  src = volume
  for axis in range(volume.ndim):
    def part(start, stop, axis=axis):
      index = [slice(None)] * volume.ndim
      index[axis] = slice(start, stop)
      return tuple(index)
    out = src * k[1]
    out[part(1, None)] += k[0] * src[part(None, -1)]
    out[part(None, 1)] += k[0] * src[part(None, 1)]  # edge replication
    out[part(None, -1)] += k[2] * src[part(1, None)]
    out[part(-1, None)] += k[2] * src[part(-1, None)]
    src = out
  return src


def _ellipsoid_depth(x: np.ndarray, y: np.ndarray, z: np.ndarray,
                     radii: Sequence[float]) -> np.ndarray:
  """Approximate signed distance (voxels) inside an ellipsoid's surface; negative outside.

  Uses (1 - rho) / |grad rho| with rho the normalised ellipsoid radius, which is exact for a
  sphere and close for a mildly eccentric ellipsoid, so shells (skull, cortex) come out with
  a near-uniform thickness.
  """
  rx, ry, rz = (float(r) for r in radii)  # Python floats keep the arrays float32
  rho = np.sqrt((x / rx)**2 + (y / ry)**2 + (z / rz)**2)
  grad = np.sqrt((x / rx**2)**2 + (y / ry**2)**2 + (z / rz**2)**2)
  # At the centre both rho and grad vanish; their ratio tends to at least the smallest radius.
  ratio = np.where(grad > 0, rho / np.maximum(grad, 1e-12), min(rx, ry, rz))
  return ((1.0 - rho) * ratio).astype(np.float32)


def _grid(shape: Sequence[int],
          centre: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Broadcastable float32 voxel coordinates relative to `centre`.

  Offsets and radii are used as Python floats throughout: a numpy float64 scalar would
  silently promote whole volumes to float64.
  """
  return tuple(
      (np.arange(n, dtype=np.float32) - float(c)).reshape([-1 if a == i else 1 for a in range(3)])
      for i, (n, c) in enumerate(zip(shape, centre)))


def _anatomy(
    rng: np.random.Generator, shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Draws the normal head anatomy.

  Returns:
    (tissue map uint8, head centre, inner brain radii, depth below the brain surface).
  """
  nx, ny, nz = shape
  scale = min(nx, ny) / 128.0  # anatomy thicknesses are in voxels of a 128-wide volume
  centre = np.array([(nx - 1) / 2, (ny - 1) / 2, (nz - 1) / 2]) + rng.uniform(-1.5, 1.5, 3)
  # Left-right narrower than anterior-posterior, like a real head in the axial plane.
  radii = np.array([0.40 * nx, 0.46 * ny, 0.45 * nz]) * rng.uniform(0.95, 1.03, 3)
  x, y, z = _grid(shape, centre)
  depth = _ellipsoid_depth(x, y, z, radii)

  t_skull = max(2.0, 3.0 * scale)
  t_csf = max(1.0, 1.5 * scale)
  t_cortex = max(2.0, 4.5 * scale)
  brain_depth = depth - t_skull - t_csf

  tissue = np.zeros(shape, dtype=np.uint8)
  tissue[depth > 0] = SKULL
  tissue[depth > t_skull] = CSF
  brain = brain_depth > 0
  tissue[brain] = GM
  # Wavy grey/white boundary: cortex thickness modulated by low-frequency noise.
  wave = _smooth_noise(rng, shape, (8, 8, 6))
  tissue[brain_depth > t_cortex * (1.0 + 0.35 * wave)] = WM

  # Gyri and sulci: CSF sheets along the zero level set of a field that varies only with
  # direction from the centre (sampled on an inner ellipsoid and projected outwards), so the
  # sulci run radially in from the surface. Each sulcus is lined with a cortex-thick layer of
  # grey matter; the white matter left between neighbouring sulci forms the gyral cores.
  max_reach = max(4.0, 10.0 * scale)  # deepest sulcus, below the brain surface
  band = brain & (brain_depth < max_reach + t_cortex)
  field = _smooth_noise(rng, shape, (26, 26, 20))
  idx = np.nonzero(band)
  rho = np.sqrt(((idx[0] - centre[0]) / radii[0])**2 + ((idx[1] - centre[1]) / radii[1])**2 +
                ((idx[2] - centre[2]) / radii[2])**2)
  shrink = 0.8 / np.maximum(rho, 1e-6)
  proj = tuple(np.clip(np.rint(c + (i - c) * shrink), 0, n - 1).astype(np.intp)
               for i, c, n in zip(idx, centre, shape))
  # First-order distance (voxels) to the sulcal sheet: |f| / |grad f|, rescaled from the
  # sampling ellipsoid out to the voxel's own radius.
  grad = np.sqrt(sum(g[proj]**2 for g in np.gradient(field)))
  dist = np.abs(field[proj]) / (np.maximum(grad, 1e-3) * shrink)
  # Sulci of varying depth that narrow towards their fundus (V-shaped).
  reach = max_reach * np.clip(0.7 + 0.3 * wave[idx], 0.3, 1.0)
  in_depth = brain_depth[idx]
  taper = np.clip(1.0 - in_depth / reach, 0.0, 1.0)
  lined = (dist < t_cortex) & (in_depth < reach + 0.7 * t_cortex)
  tissue[tuple(i[lined] for i in idx)] = GM
  sulcus = (dist < 0.4 + 1.1 * taper) & (in_depth < reach)
  tissue[tuple(i[sulcus] for i in idx)] = CSF

  brx, bry, brz = (float(r) - t_skull - t_csf for r in radii)
  # Interhemispheric fissure, interrupted around the corpus callosum near the centre.
  callosum = (y / (0.55 * bry))**2 + ((z + 0.05 * brz) / (0.40 * brz))**2 < 1.0
  half_width = max(0.6, 0.8 * scale)
  fissure = brain & ~callosum
  tissue[fissure & (np.abs(x) < half_width + max(1.0, 2.0 * scale))] = GM
  tissue[fissure & (np.abs(x) < half_width)] = CSF

  # Deep grey matter: lentiform nuclei lateral to the ventricles, thalami behind them.
  for side in (-1.0, 1.0):
    for cx, cy, ax, ay in ((0.36, 0.12, 0.08, 0.18), (0.14, -0.20, 0.09, 0.11)):
      dgm = (((x - side * cx * brx) / (ax * brx))**2 + ((y - cy * bry) / (ay * bry))**2 +
             ((z + 0.02 * brz) / (0.16 * brz))**2)
      tissue[dgm < 1.0] = DEEP_GM

  # Lateral ventricles: two elongated ellipsoids, rotated so they nearly meet at the front
  # (+y, anterior in the LPS affine) and diverge towards the back, like the axial "butterfly".
  vsize = rng.uniform(0.8, 1.25)
  vy_shift = rng.uniform(-0.05, 0.05) * bry
  angle = math.radians(rng.uniform(6.0, 12.0))
  cos, sin = math.cos(angle), math.sin(angle)
  for side in (-1.0, 1.0):
    xv = x - side * 0.15 * brx
    yv = y - vy_shift
    along = cos * yv + side * sin * xv
    across = cos * xv - side * sin * yv
    vent = ((across / (0.085 * brx * vsize))**2 + (along / (0.38 * bry))**2 +
            ((z - 0.10 * brz) / (0.20 * brz * vsize))**2)
    tissue[vent < 1.0] = CSF
  return tissue, centre, np.array([brx, bry, brz]), brain_depth


def _add_tumour(rng: np.random.Generator, tissue: np.ndarray, centre: np.ndarray,
                brain_radii: np.ndarray, brain_depth: np.ndarray) -> None:
  """Draws a glioma-like tumour into `tissue` in place (inside the brain only)."""
  shape = tissue.shape
  brx, bry, brz = brain_radii
  size = rng.uniform(0.22, 0.40) * min(brx, bry)  # oedema radius in voxels
  axes = size * rng.uniform(0.8, 1.2, 3)
  # Pick a centre in one hemisphere, deep enough that the core lies inside the brain.
  side = rng.choice([-1.0, 1.0])
  for _ in range(100):
    offset = np.array([side * rng.uniform(0.20, 0.55) * brx, rng.uniform(-0.5, 0.5) * bry,
                       rng.uniform(-0.35, 0.45) * brz])
    c = np.round(centre + offset).astype(int)
    if brain_depth[tuple(c)] > 0.8 * axes.max():
      break
  # Work in a bounding box: tumour noise fields only need to cover the tumour.
  reach = np.ceil(axes * 1.7).astype(int) + 2
  lo = np.maximum(c - reach, 0)
  hi = np.minimum(c + reach + 1, shape)
  box = tuple(slice(a, b) for a, b in zip(lo, hi))
  bshape = tuple(int(b - a) for a, b in zip(lo, hi))
  x, y, z = _grid(bshape, c - lo)
  r = np.sqrt((x / axes[0])**2 + (y / axes[1])**2 + (z / axes[2])**2)

  # Irregular, finger-like oedema: radius perturbed by coarse and finer noise. Oedema spreads
  # along white matter, so it reaches less far into grey matter and never into CSF.
  rough = (0.30 * _smooth_noise(rng, bshape, (4, 4, 4)) +
           0.12 * _smooth_noise(rng, bshape, (8, 8, 8)))
  sub = tissue[box]
  # The falx keeps a tumour in its own hemisphere.
  inside_brain = (brain_depth[box] > 0) & (side * (x + float(c[0] - centre[0])) > -0.5)
  grey = (sub == GM) | (sub == DEEP_GM)
  oedema = inside_brain & (((sub == WM) & (r < 1.0 + rough)) | (grey & (r < 0.8 + rough)))
  sub[oedema] = OEDEMA

  core_frac = rng.uniform(0.45, 0.70)
  wobble = _smooth_noise(rng, bshape, (5, 5, 5))
  core_r = r / core_frac  # 1 at the nominal core surface
  core = inside_brain & (core_r < 1.0 + 0.15 * wobble)
  core_radius = core_frac * float(axes.min())
  # A rim under 2 voxels would be mostly partial volume once blurred, no longer bright.
  rim = max(2.0, rng.uniform(0.30, 0.45) * core_radius)
  solid = rng.uniform() < 0.2 or core_radius - rim < 1.0
  if solid:
    # Solid tumour: patches of enhancing and non-enhancing core, no necrotic cavity.
    patches = _smooth_noise(rng, bshape, (5, 5, 5))
    # Threshold at a quantile so that enhancing tumour is always present (40-70% of core).
    cut = np.quantile(patches[core], rng.uniform(0.3, 0.6)) if core.any() else 0.0
    sub[core] = np.where(patches[core] > cut, ENHANCING, NON_ENHANCING)
  else:
    # Enhancing rim around a necrotic centre; the shared `wobble` keeps the rim even.
    inner = 1.0 - rim / core_radius
    jitter = 0.06 * _smooth_noise(rng, bshape, (6, 6, 6))
    sub[core] = ENHANCING
    sub[core & (core_r < inner * (1.0 + 0.15 * wobble) + jitter)] = NECROSIS


def _bias_field(rng: np.random.Generator, shape: Sequence[int], centre: np.ndarray,
                head: np.ndarray) -> np.ndarray:
  """Smooth multiplicative bias field: a random quadratic reaching +-8..15% over the head."""
  x, y, z = _grid(shape, centre)
  u, v, w = x / (shape[0] / 2), y / (shape[1] / 2), z / (shape[2] / 2)
  terms = (u, v, w, u * u, v * v, w * w, u * v, u * w, v * w)
  coef = rng.standard_normal(len(terms)).astype(np.float32)
  poly = sum(a * t for a, t in zip(coef, terms))
  poly = poly - poly[head].mean()
  peak = max(float(np.abs(poly[head]).max()), 1e-6)
  return (1.0 + poly * (rng.uniform(0.08, 0.15) / peak)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class ScannerShift:
  """How a "shifted" data set's images differ from the default phantoms (anatomy and labels do
  not): the shape of a test set from another scanner or protocol, never trained on.

  Attributes:
    contrast_jitter: each tissue's mean in each modality is further multiplied by
      ``1 + U(-contrast_jitter, contrast_jitter)``, per case (0: the default contrasts).
    noise: multiplies the Rician noise level (1: the default 2-3% of white matter).
    bias: multiplies the bias field's deviation from 1 (1: the default +-8..15% over the head).
  """
  contrast_jitter: float = 0.0
  noise: float = 1.0
  bias: float = 1.0

  @property
  def is_default(self) -> bool:
    return self == ScannerShift()

  def check(self) -> "ScannerShift":
    for name in ("contrast_jitter", "noise", "bias"):
      value = getattr(self, name)
      if not isinstance(value, (int, float)) or isinstance(value, bool) or not (
          math.isfinite(value) and value >= 0):
        raise UserError(f"{name} must be a finite number >= 0, got {value!r}")
    if self.contrast_jitter >= 1:
      raise UserError(f"contrast_jitter must be < 1 (a tissue mean stays positive), got "
                      f"{self.contrast_jitter!r}")
    return self


def _phantom(
    seed: int, case_index: int, shape: tuple[int, int, int],
    shift: ScannerShift = ScannerShift()
) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
  """Draws one case; returns (images, label, tissue map)."""
  rng = np.random.default_rng([seed, case_index])
  # The shift's draws come from their own stream, so the main stream (anatomy, tumour, texture)
  # draws exactly as without a shift.
  shift_rng = np.random.default_rng([seed, case_index, 1])
  tissue, centre, brain_radii, brain_depth = _anatomy(rng, shape)
  _add_tumour(rng, tissue, centre, brain_radii, brain_depth)
  head = tissue != BACKGROUND

  # Texture is anatomy, so shared by the modalities; each mixes two fields differently.
  tex_a = _smooth_noise(rng, shape, (20, 20, 15))
  tex_b = _smooth_noise(rng, shape, (20, 20, 15))
  tex_amp = _TEXTURE[tissue]
  background = ~head
  images = {}
  # In-place float32 arithmetic throughout: this loop dominates the run time.
  for m, name in enumerate(MODALITIES):
    # Small per-case jitter of the tissue means (scanner/protocol variation).
    jitter = np.clip(rng.normal(0.0, 0.02, len(TISSUES)), -0.04, 0.04)
    means = (_MEANS[:, m] * (1.0 + jitter)).astype(np.float32)
    if shift.contrast_jitter:
      means *= (1.0 + shift_rng.uniform(-shift.contrast_jitter, shift.contrast_jitter,
                                        len(TISSUES))).astype(np.float32)
    theta = float(rng.uniform(0.0, 2.0 * np.pi))
    img = tex_a * math.cos(theta)
    img += tex_b * math.sin(theta)
    img *= tex_amp
    img += 1.0
    img *= means[tissue]
    img = _blur(img)  # partial-volume mixing at tissue borders
    field = _bias_field(rng, shape, centre, head)
    if shift.bias != 1.0:
      field = 1.0 + (field - 1.0) * np.float32(shift.bias)
    img *= field
    # Rician noise: magnitude of the signal plus complex Gaussian noise.
    sigma = float(rng.uniform(0.02, 0.03) * means[WM]) * shift.noise
    noise = rng.standard_normal((2,) + shape, dtype=np.float32)
    noise *= sigma
    img += noise[0]
    np.square(img, out=img)
    np.square(noise[1], out=noise[1])
    img += noise[1]
    np.sqrt(img, out=img)
    img *= _INT_SCALE
    np.rint(img, out=img)
    np.clip(img, 1, np.iinfo(np.int16).max, out=img)
    out = img.astype(np.int16)
    out[background] = 0  # background exactly 0, head strictly positive: non-zero = head mask
    images[name] = out
  return images, _TISSUE_TO_LABEL[tissue], tissue


def make_phantom(
    *, seed: int, case_index: int, shape: Sequence[int] = DEFAULT_SHAPE,
    return_tissues: bool = False, shift: ScannerShift = ScannerShift()
) -> (tuple[dict[str, np.ndarray], np.ndarray] |
      tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]):
  """Draws one synthetic case.

  Args:
    seed: dataset seed (non-negative).
    case_index: index of the case in the dataset (non-negative); the case depends only on
      ``(seed, case_index, shape)``.
    shape: volume shape (X, Y, Z); axial slices run along axis 2; each dimension >= 32.
    return_tissues: also return the internal tissue map (codes index `TISSUES`), e.g. to get
      white matter or CSF masks.
    shift: a scanner shift of the images (`ScannerShift`; default none); the anatomy, tissue map
      and label are the same with or without one.

  Returns:
    ``(images, label)``, or ``(images, label, tissues)`` with `return_tissues`: `images` maps
    each of `MODALITIES` to an int16 (X, Y, Z) volume, 0 outside the head and positive inside;
    `label` is uint8 (X, Y, Z) with BraTS values 0 background, 1 necrosis / non-enhancing
    core, 2 oedema, 4 enhancing tumour; `tissues` is uint8 (X, Y, Z).

  Raises:
    UserError: bad seed, case index or shape.
  """
  seed = _check_nonneg_int("seed", seed)
  case_index = _check_nonneg_int("case_index", case_index)
  images, label, tissue = _phantom(seed, case_index, _check_shape(shape), shift.check())
  if return_tissues:
    return images, label, tissue
  return images, label


def _check_spacing(spacing: float | Sequence[float]) -> tuple[float, float, float]:
  values = (spacing,) * 3 if np.isscalar(spacing) else tuple(spacing)
  if not all(isinstance(v, (int, float, np.number)) and not isinstance(v, bool) for v in values):
    values = ()
  values = tuple(float(v) for v in values)
  if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
    raise UserError(f"spacing must be one or three positive numbers (mm), got {spacing!r}")
  return values


def brats_affine(shape: Sequence[int], spacing: float | Sequence[float] = DEFAULT_SPACING
                 ) -> np.ndarray:
  """BraTS-like voxel-to-world affine: LPS axes, volume centre near the origin.

  Args:
    shape: volume shape (X, Y, Z).
    spacing: voxel size in mm, one number (isotropic) or (X, Y, Z).

  Returns:
    4x4 float64 affine.
  """
  sx, sy, sz = _check_spacing(spacing)
  affine = np.diag([-sx, -sy, sz, 1.0])
  affine[:3, 3] = -affine[:3, :3] @ ((np.asarray(shape, dtype=np.float64) - 1) / 2)
  return affine


def _nifti_gz(data: np.ndarray, affine: np.ndarray, descrip: str) -> bytes:
  """Serialises a volume as reproducible .nii.gz bytes (no gzip timestamp)."""
  img = nib.Nifti1Image(data, affine)
  img.header.set_data_dtype(data.dtype)
  img.header.set_xyzt_units("mm", "sec")
  img.header["descrip"] = descrip.encode("ascii")[:79]
  img.set_qform(affine, code=1)  # 1 = scanner anatomical
  img.set_sform(affine, code=1)
  # nibabel's gzip writer stamps the current time; mtime=0 makes files byte-identical.
  return gzip.compress(img.to_bytes(), compresslevel=6, mtime=0)


def case_name(index: int) -> str:
  """Folder and file stem of case `index`, e.g. ``SynthBraTS_00003``."""
  return f"{CASE_PREFIX}_{index:05d}"


_CASE_RE = re.compile(rf"{CASE_PREFIX}_(\d{{5}})")
_SUFFIXES = tuple(MODALITIES) + ("seg",)


def _previous_cases(out: Path) -> list[Path]:
  """Checks that an existing folder is empty or a previous synthetic dataset.

  Args:
    out: existing directory.

  Returns:
    The case folders found in it.

  Raises:
    UserError: the folder holds anything that this module did not write.
  """
  entries = sorted(out.iterdir())
  if not entries:
    return []
  foreign = UserError(
      f"{out}: folder is not empty and does not look like a previous synthetic dataset "
      f"(no {CASE_PREFIX} README.txt or unexpected files); refusing to overwrite it")
  readme = out / "README.txt"
  try:
    first_line = readme.read_text(encoding="utf-8").splitlines()[0] if readme.is_file() else ""
  except (OSError, UnicodeDecodeError, IndexError):
    first_line = ""
  if first_line != README_MARKER:
    raise foreign
  cases = []
  for entry in entries:
    if entry == readme:
      continue
    if not (entry.is_dir() and not entry.is_symlink() and _CASE_RE.fullmatch(entry.name)):
      raise foreign
    allowed = {f"{entry.name}_{s}.nii.gz" for s in _SUFFIXES}
    if any(f.name not in allowed or not f.is_file() for f in entry.iterdir()):
      raise foreign
    cases.append(entry)
  return cases


def _readme(seed: int, shape: tuple[int, int, int], cases: int,
            spacing: tuple[float, float, float],
            shift: ScannerShift = ScannerShift()) -> str:
  """README.txt text; deterministic (no dates) so reruns are byte-identical."""
  stem = case_name(0)
  shifted = [] if shift.is_default else [
      f"Scanner shift: contrast jitter {shift.contrast_jitter:g}, noise x{shift.noise:g}, "
      f"bias x{shift.bias:g} (images only; anatomy and labels as without it)."]
  return "\n".join([
      README_MARKER,
      "",
      "Generator: uagan_jax.data.synthetic.write_dataset (numpy phantoms, not patient data).",
      f"Seed: {seed}",
      f"Shape (X, Y, Z): {shape[0]} x {shape[1]} x {shape[2]}",
      f"Cases: {cases} ({case_name(0)} .. {case_name(cases - 1)})",
      "Case i depends only on (seed, i, shape): rng = numpy.random.default_rng([seed, i]).",
      *shifted,
      "",
      "Layout (BraTS 2021):",
      f"  {stem}/{stem}_{{t1,t1ce,t2,flair}}.nii.gz  int16 images, 0 outside the head",
      f"  {stem}/{stem}_seg.nii.gz                  uint8 labels",
      f"Geometry: {' x '.join(f'{v:g}' for v in spacing)} mm voxels, LPS orientation (affine "
      f"diag({-spacing[0]:g}, {-spacing[1]:g}, {spacing[2]:g})), volume",
      "centre near world origin, qform/sform code 1 (scanner). Axial slices run along axis 2.",
      "",
      "Labels (BraTS convention):",
      "  0 background / healthy tissue",
      "  1 necrosis or non-enhancing tumour core (NCR/NET)",
      "  2 peritumoural oedema (ED)",
      "  4 enhancing tumour (ET)",
      "Regions: WT = {1, 2, 4}, TC = {1, 4}, ET = {4}.",
      "",
  ])


def write_dataset(out: str | Path, *, cases: int, seed: int,
                  shape: Sequence[int] = DEFAULT_SHAPE,
                  spacing: float | Sequence[float] = DEFAULT_SPACING,
                  progress: Callable[[int, int], None] | None = None,
                  shift: ScannerShift = ScannerShift()) -> list[Path]:
  """Writes synthetic cases in the BraTS 2021 layout.

  Writes ``out/SynthBraTS_{i:05d}/SynthBraTS_{i:05d}_{t1,t1ce,t2,flair,seg}.nii.gz`` for
  ``i < cases`` and ``out/README.txt``. Files are byte-identical for the same arguments.
  `out` may be missing, empty, or a previous output of this function (its files are
  replaced and surplus case folders removed); anything else is refused.

  Args:
    out: output folder.
    cases: number of cases (>= 1).
    seed: dataset seed (non-negative).
    shape: volume shape (X, Y, Z), each dimension >= 32.
    spacing: voxel size in mm written in the headers, one number or (X, Y, Z); the arrays do not
      depend on it (DEMO_SPACING gives the brain a real head's size).
    progress: optional callback, called as ``progress(done, cases)`` after each case.
    shift: a scanner shift of the images (`ScannerShift`), for a test set unlike the training
      phantoms; default none (today's files, byte for byte).

  Returns:
    The case folders, in index order.

  Raises:
    UserError: bad arguments, or `out` is a file or a non-empty foreign folder.
  """
  if not isinstance(cases, (int, np.integer)) or isinstance(cases, bool) or cases < 1:
    raise UserError(f"cases must be an integer >= 1, got {cases!r}")
  cases = int(cases)
  seed = _check_nonneg_int("seed", seed)
  shape = _check_shape(shape)
  spacing = _check_spacing(spacing)
  shift = shift.check()
  out = Path(out)
  if out.exists() and not out.is_dir():
    raise UserError(f"{out}: exists and is not a folder")
  previous = _previous_cases(out) if out.is_dir() else []
  out.mkdir(parents=True, exist_ok=True)

  # Surplus cases of a larger previous run would silently join this dataset; remove them
  # (`_previous_cases` has checked they hold only files this module writes).
  for folder in previous:
    if int(_CASE_RE.fullmatch(folder.name).group(1)) >= cases:
      for f in folder.iterdir():
        f.unlink()
      folder.rmdir()

  # README first: it marks the folder as ours, so an interrupted run can simply be rerun.
  (out / "README.txt").write_text(_readme(seed, shape, cases, spacing, shift), encoding="utf-8")
  affine = brats_affine(shape, spacing)
  folders = []
  for i in range(cases):
    images, label = make_phantom(seed=seed, case_index=i, shape=shape, shift=shift)
    name = case_name(i)
    folder = out / name
    folder.mkdir(exist_ok=True)
    descrip = f"{CASE_PREFIX} seed={seed} case={i}"
    volumes = [(m, images[m]) for m in MODALITIES] + [("seg", label)]
    for suffix, data in volumes:
      (folder / f"{name}_{suffix}.nii.gz").write_bytes(_nifti_gz(data, affine, descrip))
    folders.append(folder)
    if progress is not None:
      progress(i + 1, cases)
  return folders
