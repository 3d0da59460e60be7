"""uagan_jax: unified GAN-based multi-modal brain tumour segmentation in JAX/Flax.

SegAN (segmentor + multi-scale L1 critic), StarGAN (multi-domain translation) and UAGAN (both,
trained on unpaired modalities with attention fusion) as pure Flax modules and one compiled
data-parallel train step.
"""

__version__ = "0.1.0"
