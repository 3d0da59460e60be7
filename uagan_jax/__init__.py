"""uagan_jax: unified GAN-based multi-modal brain tumour segmentation in JAX/Flax.

SegAN (segmentor + multi-scale L1 critic), StarGAN (multi-domain translation) and UAGAN (both,
trained on unpaired modalities with attention fusion) as pure Flax modules and one compiled
data-parallel train step.
"""

# The same as setup.cfg's version (a test checks); `uagan-jax --version` prints the installed
# package's version and falls back to this one in a tree that is not installed.
__version__ = "0.1.0"
