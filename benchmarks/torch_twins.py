"""PyTorch twins of the project's networks and train steps, for benchmarks/compare_torch.py.

Each module matches its Flax original in uagan_jax/models/ layer for layer: the same widths,
depth, kernels, strides, padding, biases, norms (BatchNorm, InstanceNorm, the conditional
instance norm), bilinear-resize upsampling, transposed convolutions, skips, attention gates and
output heads, so the parameter counts and output shapes are equal (tests/test_compare_torch.py).
Each step matches the family's ``train_phases`` (uagan_jax/families/): the same phases in the
same order, the same losses (Dice, BCE, the multi-scale L1, weight clipping, WGAN-GP with its
second-order pass, classification, cycle, shape) and Adam with the config's betas and learning
rates. Layout is PyTorch's own, NCHW. Augmentation is off on both sides of the comparison.

What the twins do not reproduce, being irrelevant to speed: the initialisation (PyTorch's
defaults) and the per-parameter norms the JAX step logs as metrics (a few reductions).

Needs the optional extra: ``pip install -e '.[torch]'``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

NUM_MODALITIES = 4
_IN_EPSILON = 1e-5  # PyTorch's InstanceNorm2d default, which the Flax models use too
_SKIP_LIMIT = 0.98
# families/uagan.TRANSLATION_PREFIXES, in this file's attribute names.
TRANSLATION_PREFIXES = ("gen_", "fuse_seg_to_gen")


def modality_planes(modality: torch.Tensor, *, height: int, width: int) -> torch.Tensor:
  """[B] ids -> [B, 4, H, W] one-hot planes."""
  one_hot = F.one_hot(modality.long(), NUM_MODALITIES).float()
  return one_hot[:, :, None, None].expand(-1, -1, height, width)


def down_conv(in_channels: int, out_channels: int, *, bias: bool) -> nn.Conv2d:
  """4x4 stride-2 conv with one pixel of padding (segan._DOWN, stargan._DOWN)."""
  return nn.Conv2d(in_channels, out_channels, 4, 2, 1, bias=bias)


def upsample2x(x: torch.Tensor) -> torch.Tensor:
  """Bilinear resize by 2, half-pixel centres as jax.image.resize (segan.upsample2x)."""
  return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


# ------------------------------------------------------------------------------------------------
# SegAN: Segmentor S and Critic C (uagan_jax/models/segan.py)
# ------------------------------------------------------------------------------------------------


class SegmentorEncoder(nn.Module):
  """segan.segmentor_encoder: one 4x4 stride-2 conv per width, BatchNorm but on the first,
  LeakyReLU(0.2); returns (bottleneck, skips fine to coarse)."""

  def __init__(self, features: Sequence[int]):
    super().__init__()
    channels = [1 + NUM_MODALITIES] + list(features)
    self.convs = nn.ModuleList(down_conv(channels[i], channels[i + 1], bias=i == 0)
                               for i in range(len(features)))
    self.norms = nn.ModuleList(nn.BatchNorm2d(w, momentum=0.1, eps=1e-5) for w in features[1:])

  def forward(self, image, modality):
    x = torch.cat([image, modality_planes(modality, height=image.shape[2], width=image.shape[3])],
                  dim=1)
    skips = []
    for level, conv in enumerate(self.convs):
      x = conv(x)
      if level > 0:
        x = self.norms[level - 1](x)
      x = F.leaky_relu(x, 0.2)
      skips.append(x)
    skips.pop()
    return x, skips


class SegmentorUp(nn.Module):
  """segan.segmentor_up: bilinear x2, 3x3 conv (no bias), BatchNorm, ReLU."""

  def __init__(self, in_channels: int, out_channels: int):
    super().__init__()
    self.conv = nn.Conv2d(in_channels, out_channels, 3, 1, 1, bias=False)
    self.norm = nn.BatchNorm2d(out_channels, momentum=0.1, eps=1e-5)

  def forward(self, x):
    return F.relu(self.norm(self.conv(upsample2x(x))))


class Segmentor(nn.Module):
  """segan.Segmentor: encoder, resize + 3x3 decoder with skips, 3x3 logits (with bias)."""

  def __init__(self, features: Sequence[int], num_regions: int = 3):
    super().__init__()
    self.features = tuple(features)
    self.encoder = SegmentorEncoder(features)
    ups = {}
    in_channels = features[-1]
    for level in reversed(range(len(features) - 1)):
      ups[f"up{level}"] = SegmentorUp(in_channels, features[level])
      in_channels = 2 * features[level]
    self.ups = nn.ModuleDict(ups)
    self.head_conv = SegmentorUp(in_channels, features[0])
    self.logits = nn.Conv2d(features[0], num_regions, 3, 1, 1)

  def forward(self, image, modality):
    x, skips = self.encoder(image, modality)
    for level in reversed(range(len(self.features) - 1)):
      x = torch.cat([self.ups[f"up{level}"](x), skips[level]], dim=1)
    return self.logits(self.head_conv(x))


class Critic(nn.Module):
  """segan.Critic with norm "batch": 4x4 stride-2 blocks, BatchNorm but on the first,
  LeakyReLU(0.2); returns the input and every block's features."""

  def __init__(self, features: Sequence[int], in_channels: int = 3):
    super().__init__()
    channels = [in_channels] + list(features)
    self.convs = nn.ModuleList(down_conv(channels[i], channels[i + 1], bias=i == 0)
                               for i in range(len(features)))
    self.norms = nn.ModuleList(nn.BatchNorm2d(w) for w in features[1:])

  def forward(self, masked):
    features, x = [masked], masked
    for level, conv in enumerate(self.convs):
      x = conv(x)
      if level > 0:
        x = self.norms[level - 1](x)
      x = F.leaky_relu(x, 0.2)
      features.append(x)
    return features


def mask_image(image, regions):
  """segan.mask_image for one image channel: [B,1,H,W] x [B,R,H,W] -> [B,R,H,W]."""
  return image * regions


# ------------------------------------------------------------------------------------------------
# StarGAN: Generator G and Discriminator D (uagan_jax/models/stargan.py)
# ------------------------------------------------------------------------------------------------


class ConditionalInstanceNorm(nn.Module):
  """stargan.ConditionalInstanceNorm: InstanceNorm, then a scale and offset per modality."""

  def __init__(self, channels: int):
    super().__init__()
    self.scale = nn.Parameter(torch.ones(NUM_MODALITIES, channels))
    self.bias = nn.Parameter(torch.zeros(NUM_MODALITIES, channels))

  def forward(self, x, modality):
    x = F.instance_norm(x, eps=_IN_EPSILON)
    return x * self.scale[modality][:, :, None, None] + self.bias[modality][:, :, None, None]


class InstanceNorm(nn.Module):
  """Flax nn.InstanceNorm (scale and bias per channel) = InstanceNorm2d(affine=True)."""

  def __init__(self, channels: int):
    super().__init__()
    self.norm = nn.InstanceNorm2d(channels, eps=_IN_EPSILON, affine=True)

  def forward(self, x, modality):
    del modality
    return self.norm(x)


def generator_norm(kind: str, channels: int) -> nn.Module:
  if kind == "instance":
    return InstanceNorm(channels)
  if kind == "conditional_instance":
    return ConditionalInstanceNorm(channels)
  raise ValueError(f"unknown generator norm {kind!r}")


class GeneratorEncoder(nn.Module):
  """stargan.generator_encoder: 7x7 stem, two 4x4 stride-2 downs, residual blocks, bias-free."""

  def __init__(self, base_features: int, num_residual: int, norm: str):
    super().__init__()
    self.stem = nn.Conv2d(1 + NUM_MODALITIES, base_features, 7, 1, 3, bias=False)
    self.stem_norm = generator_norm(norm, base_features)
    features = base_features
    self.downs, self.down_norms = nn.ModuleList(), nn.ModuleList()
    for _ in range(2):
      self.downs.append(down_conv(features, 2 * features, bias=False))
      features *= 2
      self.down_norms.append(generator_norm(norm, features))
    self.res_convs = nn.ModuleList(nn.Conv2d(features, features, 3, 1, 1, bias=False)
                                   for _ in range(2 * num_residual))
    self.res_norms = nn.ModuleList(generator_norm(norm, features) for _ in range(2 * num_residual))
    self.features = features

  def forward(self, image, target):
    x = torch.cat([image, modality_planes(target, height=image.shape[2], width=image.shape[3])],
                  dim=1)
    x = F.relu(self.stem_norm(self.stem(x), target))
    for conv, norm in zip(self.downs, self.down_norms):
      x = F.relu(norm(conv(x), target))
    for block in range(len(self.res_convs) // 2):
      y = F.relu(self.res_norms[2 * block](self.res_convs[2 * block](x), target))
      x = x + self.res_norms[2 * block + 1](self.res_convs[2 * block + 1](y), target)
    return x


class GeneratorUp(nn.Module):
  """stargan.generator_up: 4x4 stride-2 transposed conv (PyTorch's ConvTranspose2d(4, 2, 1)),
  norm, ReLU."""

  def __init__(self, in_channels: int, out_channels: int, norm: str):
    super().__init__()
    self.conv = nn.ConvTranspose2d(in_channels, out_channels, 4, 2, 1, bias=False)
    self.norm = generator_norm(norm, out_channels)

  def forward(self, x, target):
    return F.relu(self.norm(self.conv(x), target))


class GeneratorOutput(nn.Module):
  """stargan.generator_output: the 7x7 head ("tanh", "residual" or "blend"), optionally one head
  per example's index among ``num_heads``."""

  def __init__(self, in_channels: int, kind: str, num_heads: int = 1):
    super().__init__()
    self.kind, self.num_heads = kind, num_heads
    self.head = nn.Conv2d(in_channels, num_heads, 7, 1, 3, bias=False)
    self.mask = nn.Conv2d(in_channels, num_heads, 7, 1, 3) if kind == "blend" else None

  def own_head(self, outputs, head_index):
    if head_index is None:
      return outputs
    return torch.gather(outputs, 1, head_index.long()[:, None, None, None].expand(
        -1, 1, outputs.shape[2], outputs.shape[3]))

  def forward(self, features, image, head_index=None):
    head = self.own_head(self.head(features), head_index)
    if self.kind == "tanh":
      return torch.tanh(head)
    if self.kind == "residual":
      return torch.tanh(head + torch.atanh(image.clamp(-_SKIP_LIMIT, _SKIP_LIMIT)))
    mask = torch.sigmoid(self.own_head(self.mask(features), head_index))
    return mask * image + (1.0 - mask) * torch.tanh(head)


class Generator(nn.Module):
  """stargan.Generator."""

  def __init__(self, base_features: int, num_residual: int, norm: str, output: str):
    super().__init__()
    self.encoder = GeneratorEncoder(base_features, num_residual, norm)
    features = self.encoder.features
    self.ups = nn.ModuleList()
    for _ in range(2):
      self.ups.append(GeneratorUp(features, features // 2, norm))
      features //= 2
    self.output = GeneratorOutput(features, output)

  def forward(self, image, target):
    x = self.encoder(image, target)
    for up in self.ups:
      x = up(x, target)
    return self.output(x, image)


class Discriminator(nn.Module):
  """stargan.Discriminator: 4x4 stride-2 convs with bias and LeakyReLU(0.01); a 3x3 ``src`` head
  (one map, or one per modality) and a ``cls`` conv over the whole remaining map."""

  def __init__(self, base_features: int, num_layers: int, image_size: int,
               per_modality_scores: bool):
    super().__init__()
    channels = [1] + [base_features * 2 ** level for level in range(num_layers)]
    self.convs = nn.ModuleList(down_conv(channels[i], channels[i + 1], bias=True)
                               for i in range(num_layers))
    self.per_modality_scores = per_modality_scores
    self.src = nn.Conv2d(channels[-1], NUM_MODALITIES if per_modality_scores else 1, 3, 1, 1,
                         bias=False)
    self.cls = nn.Conv2d(channels[-1], NUM_MODALITIES, image_size // 2 ** num_layers, bias=False)

  def forward(self, image, modality=None):
    x = image
    for conv in self.convs:
      x = F.leaky_relu(conv(x), 0.01)
    src = self.src(x)
    if self.per_modality_scores:
      src = torch.gather(src, 1, modality.long()[:, None, None, None].expand(
          -1, 1, src.shape[2], src.shape[3]))
    return src, self.cls(x).flatten(1)


# ------------------------------------------------------------------------------------------------
# UAGAN's two-stream network (uagan_jax/models/uagan.py)
# ------------------------------------------------------------------------------------------------


class AttentionGate(nn.Module):
  """uagan.AttentionGate: ``W_o (f * sigmoid(W_g f))``, 1x1 convs with bias."""

  def __init__(self, in_channels: int, out_channels: int):
    super().__init__()
    self.gate = nn.Conv2d(in_channels, in_channels, 1)
    self.out = nn.Conv2d(in_channels, out_channels, 1)

  def forward(self, other):
    return self.out(other * torch.sigmoid(self.gate(other)))


class UnifiedNet(nn.Module):
  """uagan.UnifiedNet: StarGAN's and SegAN's streams, exchanging decoder features at H/2 and H."""

  def __init__(self, seg_features: Sequence[int], gen_features: int, num_residual: int, *,
               fuse: bool, fuse_reverse: bool, fuse_reverse_stop_gradient: bool, gen_norm: str,
               gen_output: str, gen_pair_heads: bool, num_regions: int = 3):
    super().__init__()
    self.seg_features = tuple(seg_features)
    self.fuse, self.fuse_reverse = fuse, fuse_reverse
    self.fuse_reverse_stop_gradient = fuse_reverse_stop_gradient
    self.gen_pair_heads = gen_pair_heads
    self.gen_encoder = GeneratorEncoder(gen_features, num_residual, gen_norm)
    self.seg_encoder = SegmentorEncoder(seg_features)
    seg_ups = {}
    in_channels = seg_features[-1]
    for level in reversed(range(1, len(seg_features) - 1)):
      seg_ups[f"up{level}"] = SegmentorUp(in_channels, seg_features[level])
      in_channels = 2 * seg_features[level]
    seg_ups["up0"] = SegmentorUp(in_channels, seg_features[0])
    seg_ups["head_conv"] = SegmentorUp(
        seg_features[0] + (seg_features[0] if len(seg_features) > 1 else 0), seg_features[0])
    self.seg_ups = nn.ModuleDict(seg_ups)
    width_g = self.gen_encoder.features
    self.gen_ups = nn.ModuleList()
    self.fuse_gen_to_seg, self.fuse_seg_to_gen = nn.ModuleList(), nn.ModuleList()
    for _ in range(2):
      self.gen_ups.append(GeneratorUp(width_g, width_g // 2, gen_norm))
      width_g //= 2
      if fuse:
        self.fuse_gen_to_seg.append(AttentionGate(width_g, seg_features[0]))
        if fuse_reverse:
          self.fuse_seg_to_gen.append(AttentionGate(seg_features[0], width_g))
    self.gen_head = GeneratorOutput(width_g, gen_output,
                                    num_heads=NUM_MODALITIES ** 2 if gen_pair_heads else 1)
    self.seg_logits = nn.Conv2d(seg_features[0], num_regions, 3, 1, 1)

  def forward(self, image, source, target, translation_input=None):
    translation_input = image if translation_input is None else translation_input
    g = self.gen_encoder(translation_input, target)
    s, skips = self.seg_encoder(image, source)
    for level in reversed(range(1, len(self.seg_features) - 1)):
      s = torch.cat([self.seg_ups[f"up{level}"](s), skips[level]], dim=1)
    for level in range(2):
      g = self.gen_ups[level](g, target)
      s = self.seg_ups["up0" if level == 0 else "head_conv"](s)
      if self.fuse:
        fused_s = s + self.fuse_gen_to_seg[level](g)
        if self.fuse_reverse:
          seg_view = s.detach() if self.fuse_reverse_stop_gradient else s
          g = g + self.fuse_seg_to_gen[level](seg_view)
        s = fused_s
      if level == 0 and skips:
        s = torch.cat([s, skips[0]], dim=1)
    pair = source.long() * NUM_MODALITIES + target.long() if self.gen_pair_heads else None
    translated = self.gen_head(g, translation_input, pair)
    return translated, self.seg_logits(s)


# ------------------------------------------------------------------------------------------------
# Losses (uagan_jax/losses.py), NCHW
# ------------------------------------------------------------------------------------------------


def soft_dice_loss(probs, targets, smooth: float = 1.0):
  intersection = (probs * targets).sum(dim=(2, 3))
  total = probs.sum(dim=(2, 3)) + targets.sum(dim=(2, 3))
  return 1.0 - ((2.0 * intersection + smooth) / (total + smooth)).mean()


def multiscale_l1(features_a, features_b):
  """The "per_scale" pooling with every scale weight 1."""
  return sum((a - b).abs().mean() for a, b in zip(features_a, features_b)) / len(features_a)


def gradient_penalty(critic_fn, real, fake, alpha):
  """WGAN-GP with the graph of the gradient kept (create_graph), the second-order pass."""
  alpha = alpha.view(-1, 1, 1, 1)
  x_hat = (alpha * real + (1.0 - alpha) * fake.detach()).requires_grad_(True)
  (grads,) = torch.autograd.grad(critic_fn(x_hat).sum(), x_hat, create_graph=True)
  norms = torch.sqrt(grads.flatten(1).pow(2).sum(dim=1) + 1e-12)
  return ((norms - 1.0) ** 2).mean()


# ------------------------------------------------------------------------------------------------
# The families' steps (uagan_jax/families/)
# ------------------------------------------------------------------------------------------------


def adam(params, lr: float, config) -> torch.optim.Adam:
  """optax.adam's defaults (eps 1e-8) with the config's betas."""
  return torch.optim.Adam(params, lr=lr, betas=(config.optim.b1, config.optim.b2), eps=1e-8)


def build_networks(config) -> dict[str, nn.Module]:
  """The family's networks, by role, as families/<name>.build_networks builds them."""
  m, name = config.model, config.model.name
  height = config.data.image_size[0]
  if m.critic_norm != "batch" or config.loss.scale_pooling != "per_scale" or tuple(
      config.loss.scale_weights):
    raise ValueError("the PyTorch twins cover the critic with BatchNorm and per-scale L1 only")
  if name in ("unet", "segan"):
    nets = {"segmentor": Segmentor(m.segmentor_features)}
    if name == "segan":
      nets["critic"] = Critic(m.critic_features)
    return nets
  disc = Discriminator(m.discriminator_features, m.discriminator_layers, height,
                       m.discriminator_per_modality)
  if name == "stargan":
    return {"generator": Generator(m.generator_features, m.generator_residual_blocks,
                                   m.generator_norm, m.generator_output),
            "discriminator": disc}
  if name == "uagan":
    return {"unified": UnifiedNet(m.segmentor_features, m.generator_features,
                                  m.generator_residual_blocks, fuse=m.fuse,
                                  fuse_reverse=m.fuse_reverse,
                                  fuse_reverse_stop_gradient=m.fuse_reverse_stop_gradient,
                                  gen_norm=m.generator_norm, gen_output=m.generator_output,
                                  gen_pair_heads=m.generator_pair_heads),
            "critic": Critic(m.critic_features), "discriminator": disc}
  raise ValueError(f"no PyTorch twin of family {name!r}")


def _set_grads(params, grads):
  for p, g in zip(params, grads):
    p.grad = g


class TorchStep:
  """One training step of the family, as its ``train_phases`` takes it (no augmentation).

  With ``train.n_critic`` > 1 the generator's objective is formed on its update steps only; the
  JAX step also forms it (not its parameter gradients) on the others, a few reductions more.

  ``step(batch)`` with batch = {"image": [B,1,H,W], "regions": [B,3,H,W], "modality": [B]}
  tensors. The random draws (targets, penalty weights) are drawn per step, as in the JAX step.
  """

  def __init__(self, config, seed: int = 0):
    torch.manual_seed(seed)
    self.config = config
    self.name = config.model.name
    self.nets = build_networks(config)
    o = config.optim
    if self.name == "uagan":
      unified = self.nets["unified"]
      # families/uagan.param_stream: the translation stream's layers follow G's learning rate.
      gen = [p for n, p in unified.named_parameters() if n.startswith(TRANSLATION_PREFIXES)]
      seg = [p for n, p in unified.named_parameters() if not n.startswith(TRANSLATION_PREFIXES)]
      self.optimizers = {"unified": torch.optim.Adam(
          [{"params": gen, "lr": o.generator_lr}, {"params": seg, "lr": o.segmentor_lr}],
          betas=(o.b1, o.b2), eps=1e-8)}
    else:
      lrs = {"segmentor": o.segmentor_lr, "generator": o.generator_lr}
      self.optimizers = {role: adam(self.nets[role].parameters(), lrs[role], config)
                         for role in ("segmentor", "generator") if role in self.nets}
    if "critic" in self.nets:
      self.optimizers["critic"] = adam(self.nets["critic"].parameters(), o.critic_lr, config)
    if "discriminator" in self.nets:
      self.optimizers["discriminator"] = adam(self.nets["discriminator"].parameters(),
                                              o.discriminator_lr, config)
    for net in self.nets.values():
      net.train()
    self.step_count = 0

  # -- phases ------------------------------------------------------------------------------------

  def _update_critic(self, image, regions, probs):
    """shared.update_critic: C ascends the multi-scale L1; weight clipping."""
    critic, optimizer = self.nets["critic"], self.optimizers["critic"]
    l1 = multiscale_l1(critic(mask_image(image, probs.detach())), critic(mask_image(image, regions)))
    optimizer.zero_grad(set_to_none=True)
    (-l1).backward()
    optimizer.step()
    with torch.no_grad():
      for p in critic.parameters():
        p.clamp_(-self.config.loss.clip_limit, self.config.loss.clip_limit)

  def _segmentation_terms(self, logits, image, regions):
    """shared.segmentation_terms: Dice + BCE (+ the multi-scale L1 against the updated C)."""
    loss = self.config.loss
    probs = torch.sigmoid(logits)
    total = (loss.dice_weight * soft_dice_loss(probs, regions)
             + loss.bce_weight * F.binary_cross_entropy_with_logits(logits, regions))
    if "critic" in self.nets:
      critic = self.nets["critic"]
      total = total + loss.adversarial_weight * multiscale_l1(
          critic(mask_image(image, probs)), critic(mask_image(image, regions)))
    return total

  def _update_discriminator(self, real, fake, source, target):
    """shared.update_discriminator: WGAN-GP + classification of the real."""
    disc, optimizer, loss = self.nets["discriminator"], self.optimizers["discriminator"], self.config.loss
    per_modality = disc.per_modality_scores
    real_src, real_cls = disc(real, source if per_modality else None)
    fake_src, _ = disc(fake.detach(), target if per_modality else None)
    alpha = torch.rand(real.shape[0])
    penalty = gradient_penalty(
        lambda x: disc(x, target if per_modality else None)[0].mean(dim=(1, 2, 3)), real, fake,
        alpha)
    total = (fake_src.mean() - real_src.mean() + loss.discriminator_gp_weight * penalty
             + loss.cls_weight * F.cross_entropy(real_cls, source.long()))
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()

  def _translation_terms(self, fake, reconstructed, real, target):
    """shared.translation_terms: WGAN against the updated D, classification, cycle."""
    disc, loss = self.nets["discriminator"], self.config.loss
    fake_src, fake_cls = disc(fake, target if disc.per_modality_scores else None)
    return (loss.gan_weight * -fake_src.mean()
            + loss.cls_weight * F.cross_entropy(fake_cls, target.long())
            + loss.cycle_weight * (real - reconstructed).abs().mean())

  def _targets(self, source):
    """shared.target_modalities with every modality allowed: a random other one."""
    offsets = torch.randint(1, NUM_MODALITIES, source.shape)
    return (source + offsets) % NUM_MODALITIES

  def _descend(self, role, total):
    """The generator's update: gradients with respect to its own parameters only."""
    params = [p for p in self.nets[role].parameters()]
    grads = torch.autograd.grad(total, params)
    optimizer = self.optimizers[role]
    optimizer.zero_grad(set_to_none=True)
    _set_grads(params, grads)
    optimizer.step()

  # -- the step ----------------------------------------------------------------------------------

  def step(self, batch):
    image, regions, source = batch["image"], batch["regions"], batch["modality"]
    clip = self.config.data.clip
    n_critic = self.config.train.n_critic
    if self.name in ("unet", "segan"):
      logits = self.nets["segmentor"](image, source)
      if self.name == "segan":
        self._update_critic(image, regions, torch.sigmoid(logits))
      self._descend("segmentor", self._segmentation_terms(logits, image, regions))
    elif self.name == "stargan":
      real, target = image / clip, self._targets(source)
      generator = self.nets["generator"]
      fake = generator(real, target)
      reconstructed = generator(fake, source)
      self._update_discriminator(real, fake, source, target)
      if self.step_count % n_critic == n_critic - 1:
        self._descend("generator", self._translation_terms(fake, reconstructed, real, target))
    else:  # uagan
      real, target = image / clip, self._targets(source)
      unified = self.nets["unified"]
      fake, logits = unified(image, source, target, translation_input=real)
      reconstructed, fake_logits = unified(fake * clip, target, source, translation_input=fake)
      self._update_discriminator(real, fake, source, target)
      self._update_critic(image, regions, torch.sigmoid(logits))
      if self.step_count % n_critic == n_critic - 1:
        loss = self.config.loss
        ramp = min(1.0, self.step_count / loss.shape_ramp_steps) if loss.shape_ramp_steps else 1.0
        shape = (F.binary_cross_entropy_with_logits(fake_logits, regions)
                 + soft_dice_loss(torch.sigmoid(fake_logits), regions))
        total = (self._translation_terms(fake, reconstructed, real, target)
                 + self._segmentation_terms(logits, image, regions)
                 + loss.shape_weight * ramp * shape)
        self._descend("unified", total)
    self.step_count += 1


def torch_batch(batch) -> dict[str, torch.Tensor]:
  """The benchmark's NHWC numpy batch as NCHW tensors."""
  return {"image": torch.from_numpy(batch["image"]).permute(0, 3, 1, 2).contiguous(),
          "regions": torch.from_numpy(batch["regions"]).permute(0, 3, 1, 2).contiguous(),
          "modality": torch.from_numpy(batch["modality"]).long()}
