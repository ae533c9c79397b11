"""Smoke tests: every script under benchmarks/ runs end to end at tiny sizes and prints its
ratio line (the numbers themselves are machine-dependent and not checked against targets)."""

import os
import re
import subprocess
import sys

import pytest

from tests.util import cli_overrides

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUMBER = r"([0-9]+\.[0-9]+)"
# Pure pooling budgets (no query path): one small train-step program per budget.
TINY = {"data.num_threads": 2}


def run_benchmark(script: str, *args: str, timeout: int = 240) -> str:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
  out = subprocess.run([sys.executable, "-m", f"benchmarks.{script.removesuffix('.py')}", *args],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
  return out.stdout


def test_budget_scaling():
  # No curriculum: the default's opens B = 64 only hundreds of steps in, after the 20 draws.
  out = run_benchmark("budget_scaling.py", *cli_overrides(**TINY, **{"model.connector.budgets": (16, 64),
                                                                     "budget.ramp_fraction": 0.0}),
                      "--budgets=16,64", "--repeats=1", "--draws=20",
                      "--prefill_batch=2", "--prefix_len=8")
  m = re.search(rf"B=16 vs B=64: train step time ratio {NUMBER} \(XLA FLOPs {NUMBER}, model {NUMBER}\); "
                rf"prefill time ratio {NUMBER} \(XLA FLOPs {NUMBER}, model {NUMBER}\)", out)
  assert m, out
  assert all(float(x) > 0 for x in m.groups())
  assert float(m.group(3)) < 1 and float(m.group(6)) < 1  # fewer tokens cost fewer FLOPs
  # Two budgets in the space, one bucket each: the sampler draws both, two programs.
  assert "distinct budgets drawn: 2 (of 2 in the space); compiled train-step programs: 2" in out, out


def test_input_pipeline():
  out = run_benchmark("input_pipeline.py", *cli_overrides(**TINY, **{"model.connector.budgets": (16,)}),
                      "--repeats=1", "--batches=2", "--sample_steps=20")
  m = re.search(rf"ratio \(pipeline / train step\): {NUMBER}x \(target >= 5x: (met|NOT met)\)", out)
  assert m and float(m.group(1)) > 0, out
  assert "num_threads 2" in out


def test_vs_transformers():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  out = run_benchmark("vs_transformers.py", "--image_size=28", "--patch_size=7", "--vision_width=32",
                      "--vision_depth=1", "--text_width=32", "--text_depth=1", "--head_dim=8",
                      "--vocab=300", "--batch=2", "--prefix_len=5", "--new_tokens=3", "--repeats=1")
  m = re.search(rf"ratio \(torch / ours\): forward {NUMBER}x, generate {NUMBER}x", out)
  assert m and all(float(x) > 0 for x in m.groups()), out
  err = re.search(r"logits rel err ([0-9.e+-]+); generated tokens equal: True \(6/6\)", out)
  assert err and float(err.group(1)) < 1e-4, out  # same weights, same outputs


def test_profile_step():
  out = run_benchmark("profile_step.py", *cli_overrides(**TINY, **{"model.connector.budgets": (16,)}),
                      "--budget=16", "--steps=1", "--top=3")
  shares = dict(re.findall(r"^  (matmul|layout copy|elementwise / reduce)\s+[0-9.]+ ms\s+([0-9.]+) %$",
                           out, re.M))
  assert "matmul" in shares, out
  assert abs(sum(float(v) for v in shares.values()) - 100) < 0.5, out  # categories partition op time
  assert re.search(r"^budget 16 \(.*\), batch \d+: \d+ ms/step wall", out, re.M), out


def test_mfu():
  out = run_benchmark("mfu.py", *cli_overrides(**TINY, **{"model.connector.budgets": (16,)}),
                      "--repeats=1", "--matmul_size=256")
  m = re.search(rf"MFU ratio \(train step / matmul\): {NUMBER}", out)
  assert m and 0 < float(m.group(1)) < 1.5, out  # a ratio of measured rates, not a constant


def test_host_malloc():
  out = run_benchmark("host_malloc.py", *cli_overrides(**TINY, **{"model.connector.budgets": (16,)}),
                      "--budgets=16", "--steps=3", "--rounds=1")
  rows = re.findall(rf"^  (system|reuse)\s+B=16:\s+{NUMBER} ms/step,\s+[0-9]+ minor faults/step", out, re.M)
  assert sorted(mode for mode, _ in rows) == ["reuse", "system"] and all(float(ms) > 0 for _, ms in rows), out
  m = re.search(rf"ratio reuse / system step time: B=16 {NUMBER}x", out)
  assert m and float(m.group(1)) > 0, out


def test_config_speed():
  # Variant 2 changes the batch size: each variant's step gets its own batch and budgets.
  out = run_benchmark("config_speed.py", *cli_overrides(**TINY, **{"model.connector.budgets": (16,)}),
                      "--budgets=16", "--repeats=1",
                      "--variant=model.vision.num_heads=1,model.connector.num_heads=1",
                      "--variant=train.batch_size=2")
  rows = re.findall(rf"^  variant (\d) \(batch (\d+)\): B=16:\s+{NUMBER}", out, re.M)
  assert [k for k, _, _ in rows] == ["0", "1", "2"] and all(float(ms) > 0 for _, _, ms in rows), out
  assert rows[2][1] == "2" and rows[0][1] == rows[1][1] != "2", out
  for k in (1, 2):
    m = re.search(rf"ratio variant {k} / variant 0: B=16 {NUMBER}x", out)
    assert m and abs(float(m.group(1)) - float(rows[k][2]) / float(rows[0][2])) < 0.05, out
  m = re.search(rf"per example, variant 2 / variant 0: B=16 {NUMBER}x", out)
  ratio = float(rows[2][2]) / 2 / (float(rows[0][2]) / int(rows[0][1]))
  assert m and abs(float(m.group(1)) - ratio) < 0.05 * max(1.0, ratio), out
  assert "per example, variant 1" not in out, out   # same batch: step ratio is the per-example one


def test_config_speed_rejects_unknown_field():
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-m", "benchmarks.config_speed",
                        "--variant=model.vision.heads=1"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and "model.vision.heads" in out.stderr, out.stderr[-2000:]


def test_config_speed_variant_overrides_apply():
  # The override parser must not depend on what is on the process's command line.
  code = ("from benchmarks import config_speed as cs; "
          "from configs import base; b = base.get_config(); "
          "c = cs.with_overrides(b, 'model.vision.num_heads=4, optim.lr=3e-3,"
          "model.connector.method=m3'); "
          "print(c.model.vision.num_heads, c.optim.lr, c.model.connector.method, "
          "b.to_dict() == base.get_config().to_dict())")  # the input config is not modified
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.split() == ["4", "0.003", "m3", "True"], out.stdout


def test_real_size_prefill():
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  # The real model's structure (224 px / patch 14: B = 16, 64, 256; PARCEL; Gemma-2 pairs) at tiny widths.
  out = run_benchmark("real_size_prefill.py", "--vision_width=32", "--vision_depth=1", "--vision_mlp=64",
                      "--vision_heads=2", "--connector_heads=2", "--connector_mlp=64", "--text_width=32",
                      "--text_depth=2", "--text_mlp=64", "--heads=2", "--kv_heads=1", "--head_dim=16",
                      "--vocab=300", "--repeats=1", timeout=480)
  for b in (16, 64):
    m = re.search(rf"^B={b} vs B=256: time ratio {NUMBER} \(cost model {NUMBER}; "
                  rf"head on the last token only {NUMBER}\)$", out, re.M)
    assert m and all(float(x) > 0 for x in m.groups()), out
    # Fewer visual tokens cost fewer FLOPs; the measured time ratio is not asserted (noise).
    assert float(m.group(2)) < 1 and float(m.group(3)) < 1, out
  m = re.search(rf"^ratio \(torch / ours\) at 256 image tokens: {NUMBER}x$", out, re.M)
  assert m and float(m.group(1)) > 0, out
