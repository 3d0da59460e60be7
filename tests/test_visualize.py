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
    assert panels[dice_loss[0]].get_ylabel() == "Dice loss (1 - soft Dice)"
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
  assert visualize.train_panel_labels("seg/bce") == ("seg/bce (train)", "binary cross-entropy")
  assert visualize.train_panel_labels("gen/total") == ("gen/total (train)",
                                                        "weighted sum of the terms")
  assert visualize.train_panel_labels("disc/wgan")[1] == "WGAN loss: D(fake) - D(real)"
  assert visualize.train_panel_labels("gen/wgan")[1] == "WGAN loss: -D(fake)"
  assert visualize.train_panel_labels("new/some_term")[1] == "some term"  # unknown: its name


# Every loss a family logs (segan, stargan, uagan with every optional term), with the norms and
# weights the figure leaves out.
EVERY_LOSS = ("seg/dice", "seg/bce", "seg/weighted_ce", "seg/adversarial", "seg/shape",
              "seg/total", "critic/l1", "critic/gradient_penalty", "disc/wgan",
              "disc/gradient_penalty", "disc/cls", "disc/total", "gen/wgan", "gen/cls",
              "gen/cycle", "gen/identity", "gen/total")


def test_every_subplot_of_the_training_curves_has_a_y_label(tmp_path):
  (tmp_path / "metrics.jsonl").write_text("".join(
      json.dumps({"step": s, **{k: 1.0 / s for k in EVERY_LOSS}, "gen/grad_norm": 2.0,
                  "seg/shape_weight": 0.5}) + "\n" for s in range(1, 4)))
  (tmp_path / "validation.jsonl").write_text(
      json.dumps({"step": 2, "cases": 2, **{f"dice/{r}": 0.5 for r in REGIONS}}) + "\n")
  fig = visualize.training_curves_figure(tmp_path / "metrics.jsonl",
                                         tmp_path / "validation.jsonl")
  try:
    drawn = [ax for ax in fig.axes if ax.lines]
    assert len(drawn) == len(EVERY_LOSS) + 1  # + validation Dice
    labels = {ax.get_title(): ax.get_ylabel() for ax in drawn}
    assert all(label.strip() for label in labels.values()), labels
    for key in EVERY_LOSS:
      title, ylabel = visualize.train_panel_labels(key)
      assert labels[title] == ylabel
      assert ylabel not in ("", "loss"), key  # names the quantity
  finally:
    plt.close(fig)


class _Volume:
  def __init__(self, images):
    self.images = images


def test_the_dice_above_a_prediction_says_it_is_the_cases_3d_dice():
  scores = {"dice_WT": 0.812, "dice_TC": 0.7, "dice_ET": 0.549}
  assert visualize.case_dice_label(scores) == "3D Dice of the case: WT 0.81 TC 0.70 ET 0.55"
  rng = np.random.default_rng(0)
  truth = np.zeros((12, 12, 5, 3), bool)
  truth[3:8, 3:8, 2, 0] = True
  predictions = {m: np.roll(truth, 1, axis=0) for m in ("t1", "flair")}
  volume = _Volume({m: rng.normal(size=(12, 12, 5)) for m in predictions})
  fig = visualize.segmentation_panel_figure(volume, truth, predictions, title="case",
                                            scores={"t1": scores, "flair": scores})
  try:
    titles = [ax.get_title() for ax in fig.axes]
    predicted = [t for t in titles if t.startswith("prediction")]
    assert predicted == ["prediction\n3D Dice of the case: WT 0.81 TC 0.70 ET 0.55"] * 2
  finally:
    plt.close(fig)


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
