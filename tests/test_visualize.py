"""The training-curves figure: losses are labelled as training losses, Dice as validation Dice;
the panels as pixels are the PNGs."""

import json

import matplotlib.pyplot as plt
import numpy as np
from PIL import Image

from uagan_jax import visualize
from uagan_jax.data import REGIONS


def _logs(tmp_path):
  (tmp_path / "metrics.jsonl").write_text("".join(
      json.dumps({"step": s, "seg/dice": 1 / s, "seg/bce": 0.5, "critic/l1": 0.1,
                  "seg/grad_norm": 3.0, "seg/shape_weight": 0.5}) + "\n"
      for s in range(1, 6)))
  (tmp_path / "validation.jsonl").write_text("".join(
      json.dumps({"step": s, **{f"dice/{r}": s / 10 for r in REGIONS}}) + "\n" for s in (2, 4)))
  return tmp_path / "metrics.jsonl", tmp_path / "validation.jsonl"


def test_dice_loss_and_validation_dice_are_labelled_apart(tmp_path):
  fig = visualize.training_curves_figure(*_logs(tmp_path))
  try:
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
    titles = list(panels)
    assert len(titles) == 4  # seg/bce, critic/l1, seg/dice, validation; no norms or weights
    dice_loss = [t for t in titles if t.startswith("seg/dice")]
    assert len(dice_loss) == 1
    assert "Dice loss (train)" in dice_loss[0] and "1 - soft Dice" in dice_loss[0]
    assert panels[dice_loss[0]].get_ylabel() == "loss"
    # the loss is plotted as logged (1 - soft Dice), not turned into a Dice
    np.testing.assert_allclose(panels[dice_loss[0]].lines[0].get_ydata(),
                               [1 / s for s in range(1, 6)])
    validation = panels[visualize.VALIDATION_DICE_TITLE]
    assert "validation" in visualize.VALIDATION_DICE_TITLE
    assert "loss" not in visualize.VALIDATION_DICE_TITLE.lower()
    assert "Dice" in validation.get_ylabel() and validation.get_ylim() == (0, 1)
    assert [line.get_label() for line in validation.lines] == list(REGIONS)
    for title in titles:  # every other panel is a training quantity, and says so
      if title != visualize.VALIDATION_DICE_TITLE:
        assert "(train)" in title, title
    assert "seg/dice" not in titles  # the bare key, beside validation Dice, misled
  finally:
    plt.close(fig)


def test_panel_labels():
  assert visualize.train_panel_labels("seg/dice")[0].startswith("seg/dice: Dice loss (train)")
  assert visualize.train_panel_labels("seg/bce") == ("seg/bce (train)", "")
  assert visualize.train_panel_labels("gen/total") == ("gen/total (train)", "loss")


def test_training_curves_still_writes_the_png_and_returns_its_path(tmp_path):
  metrics, validation = _logs(tmp_path)
  path = tmp_path / "figures" / "training_curves.png"
  assert visualize.training_curves(metrics, validation, path) == path
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert visualize.training_curves(metrics, None, tmp_path / "no_val.png").is_file()
  assert visualize.training_curves(tmp_path / "missing.jsonl", None, tmp_path / "none.png") is None
  assert not (tmp_path / "none.png").exists()
  assert visualize.training_curves_figure(tmp_path / "missing.jsonl", None) is None


def test_figure_pixels_are_the_png_the_panel_writes(tmp_path):
  """TensorBoard's panels (`figure_pixels` of the ``*_figure`` functions) are the PNGs' pixels."""
  rng = np.random.default_rng(0)
  modalities = ("t1", "t2")
  panel = {"true": {m: rng.normal(size=(16, 16)) for m in modalities},
           "translated": {(a, b): rng.normal(size=(16, 16)) for a in modalities for b in modalities}}
  path = visualize.translation_panel(panel, tmp_path / "t.png", title="case", clip=3.0)
  pixels = visualize.figure_pixels(visualize.translation_panel_figure(panel, title="case", clip=3.0),
                                   dpi=visualize.TRANSLATION_DPI)
  assert pixels.dtype == np.uint8 and pixels.ndim == 3 and pixels.shape[-1] == 3
  np.testing.assert_array_equal(pixels, np.asarray(Image.open(path).convert("RGB")))
