"""benchmarks/compare_torch.py without PyTorch: its thread settings and its table."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))
import compare_torch  # pylint: disable=g-import-not-at-top,wrong-import-position


def test_thread_env_single_and_multi_threaded(monkeypatch):
  monkeypatch.setenv("JAX_NUM_CPU_DEVICES", "4")
  one, two = compare_torch.thread_env(1), compare_torch.thread_env(2)
  assert "--xla_cpu_multi_thread_eigen=false" in one["XLA_FLAGS"]
  assert "intra_op_parallelism_threads=1" in one["XLA_FLAGS"]
  assert "intra_op_parallelism_threads=2" in two["XLA_FLAGS"]
  assert one["OMP_NUM_THREADS"] == "1" and two["OMP_NUM_THREADS"] == "2"
  assert "JAX_NUM_CPU_DEVICES" not in one  # one device, its own threads


def test_table_rows_come_from_the_measurements():
  result = {"family": "segan", "size": "demo", "image_size": [96, 96], "batch": 16, "threads": 1,
            "jax_steps_per_s": 0.4, "torch_steps_per_s": 0.5, "ratio": 0.8, "flops": 15e9,
            "load": "1.0-2.0"}
  roofline = {"jax_matmul": 40.0, "torch_matmul": 20.0, "jax_conv": 30.0, "torch_conv": 10.0,
              "load": "1.5"}
  table = compare_torch.format_table([result], {1: roofline}).splitlines()
  cells = [c.strip() for c in table[2].strip("|").split("|")]
  jax_gflops, torch_gflops = 15 * 0.4, 15 * 0.5
  assert cells == ["segan `demo` (96x96, batch 16)", "1", "0.40", "0.50", "0.80",
                   f"{jax_gflops:.1f}", f"{100 * jax_gflops / 30:.0f}%", f"{torch_gflops:.1f}",
                   f"{100 * torch_gflops / 10:.0f}%", "1.0-2.0"]
  roof = [c.strip() for c in table[3].strip("|").split("|")]
  assert roof[1:5] == ["1", "40 / 30", "20 / 10", "2.00 / 3.00"] and roof[-1] == "1.5"
  # Without a roofline the fractions say so.
  assert "n/a" in compare_torch.format_table([result], {}).splitlines()[2]


def test_overrides_reach_the_worker_and_label_the_row():
  args = compare_torch.argparse.Namespace(
      families="stargan", sizes="demo", pairs=3, steps=2, warmup=1, roofline=False,
      breakdown=False, override=["model.strided_conv=im2col", "model.dtype=bfloat16"])
  command = compare_torch.worker_command(args, 1)
  assert command[command.index("--worker") + 1:] == [
      "--threads-one=1", "--families=stargan", "--sizes=demo", "--pairs=3", "--steps=2",
      "--warmup=1", "--override=model.strided_conv=im2col", "--override=model.dtype=bfloat16",
      "--no-roofline"]
  result = {"family": "stargan", "size": "demo", "image_size": [96, 96], "batch": 16,
            "threads": 1, "jax_steps_per_s": 0.4, "torch_steps_per_s": 0.5, "ratio": 0.8,
            "flops": 15e9, "load": "1.0", "overrides": ["model.strided_conv=im2col"]}
  row = compare_torch.format_table([result], {}).splitlines()[2]
  assert row.startswith("| stargan `demo` (96x96, batch 16, model.strided_conv=im2col) | 1 |")


def test_a_malformed_override_is_refused(capsys):
  with pytest.raises(SystemExit):
    compare_torch.main(["--override", "model.strided_conv"])
  assert "KEY=VALUE" in capsys.readouterr().err


def test_breakdown_reaches_the_worker_and_its_table_divides_the_right_times():
  args = compare_torch.argparse.Namespace(
      families="segan", sizes="demo", pairs=1, steps=1, warmup=1, roofline=True, breakdown=True,
      override=[])
  assert compare_torch.worker_command(args, 2)[-1] == "--breakdown"
  result = {"family": "segan", "size": "demo", "threads": 1, "torch_steps_per_s": 2.0,
            "flops": 15e9,
            "breakdown": {"jax": {"step_ms": 800.0, "conv_ms": 600.0},
                          "torch": {"step_ms": 480.0, "conv_ms": 400.0}}}
  row = compare_torch.format_breakdown([result]).splitlines()[2]
  cells = [c.strip() for c in row.strip("|").split("|")]
  # JAX convs/rest, PyTorch convs/rest, conv time JAX/PyTorch, PyTorch's timed 500 ms / 600,
  # 15 GFLOP in 0.6 s.
  assert cells == ["segan `demo`", "1", "600 / 200", "400 / 80", "1.50", "0.83", "25.0"]
  # A multi-threaded run is profiled without the breakdown (its op times overlap): no row.
  assert len(compare_torch.format_breakdown([{**result, "breakdown": {}}]).splitlines()) == 2


def test_torch_convolution_ops_are_told_from_the_rest():
  for name in ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution",
               "aten::conv_transpose2d", "aten::convolution"):
    assert compare_torch.is_torch_convolution(name), name
  for name in ("aten::native_batch_norm", "aten::copy_", "aten::upsample_bilinear2d",
               "Optimizer.step#Adam.step", "autograd::engine::evaluate_function: "
               "ConvolutionBackward0"):
    assert not compare_torch.is_torch_convolution(name), name


def test_results_are_saved_as_they_come(tmp_path):
  path = str(tmp_path / "results.json")
  compare_torch.save_json(path, [{"family": "segan"}], {1: {"jax_conv": 80.0}})
  compare_torch.save_json(path, [{"family": "segan"}, {"family": "unet"}], {1: {"jax_conv": 80.0}})
  saved = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
  assert [r["family"] for r in saved["results"]] == ["segan", "unet"]
  assert saved["rooflines"] == {"1": {"jax_conv": 80.0}}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary left
