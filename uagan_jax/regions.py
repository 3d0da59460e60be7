"""One segmentation: the thresholded region maps made nested before anything uses them.

The segmentor has one sigmoid channel per BraTS region (WT, TC, ET), thresholded at 0.5 each.
Nothing forces the three masks to nest, yet a BraTS label map can only say nested regions: the
whole tumour contains the tumour core, which contains the enhancing tumour. `nest` makes them so,
by the rule ``eval.nesting`` names, in the one place every consumer goes through
(`inference.segment_volume`): ``predict`` writes the label map of the nested regions,
``evaluate``, validation and the figures score and draw the same nested regions, so the label
map read back from ``predict``'s file scores exactly as ``evaluate``'s row.
"""

from __future__ import annotations

import numpy as np

# eval.nesting values -> what they do (shown in errors and docs).
RULES = {
    # nnU-Net's region-to-label conversion writes WT, then TC, then ET over one another: a voxel
    # any region claims stays tumour, with the innermost claiming region's label.
    "inner_wins": "WT = WT | TC | ET, TC = TC | ET, ET = ET",
    # The outer, larger region is the more reliable channel: an inner region only counts inside it.
    "outer_gates": "WT = WT, TC = TC & WT, ET = ET & TC & WT",
}


def nest(masks: np.ndarray, *, rule: str) -> np.ndarray:
  """Boolean (..., 3) WT/TC/ET masks -> nested masks (WT >= TC >= ET) by ``rule``.

  Args:
    masks: bool (..., 3) region masks, channels (WT, TC, ET), e.g. probabilities > 0.5.
    rule: a key of `RULES`.

  Returns:
    bool (..., 3) masks with ET inside TC inside WT; nested input comes back unchanged.
  """
  masks = np.asarray(masks)
  if masks.shape[-1:] != (3,):
    raise ValueError(f"masks must end in 3 channels (WT, TC, ET), got shape {masks.shape}")
  if masks.dtype != np.bool_:
    raise ValueError(f"masks must be boolean, got {masks.dtype}; threshold probabilities first")
  wt, tc, et = masks[..., 0], masks[..., 1], masks[..., 2]
  if rule == "inner_wins":
    tc = tc | et
    wt = wt | tc
  elif rule == "outer_gates":
    tc = tc & wt
    et = et & tc
  else:
    raise ValueError(f"unknown nesting rule {rule!r}; use one of {sorted(RULES)}")
  return np.stack([wt, tc, et], axis=-1)
