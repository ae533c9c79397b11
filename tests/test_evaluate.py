"""Evaluation: encode-once equals re-encoding, checkpoint loading, retention, and the CLI."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from parcel_jax import config as config_lib
from parcel_jax import checkpoint as ckpt_lib
from parcel_jax import evaluation, flops, runs
from parcel_jax.data import pipeline
from tests.conftest import run_cli, tiny_config

# Pure pooling (4x4), 4x4 anchors + 8 queries, pure pooling (8x8). The fixture's final
# eval already compiled 16 and 64 at this batch size.
BUDGETS = (16, 24, 64)


def write_checkpoint(config, params: dict, workdir: str) -> None:
  """A step-0 checkpoint of ``params`` for ``config``. The state item holds params and step
  only (no optimizer state): ``load_run`` reads nothing else."""
  config_lib.validate_config(config)  # fills the preset sizes (data.image_size follows the ViT's)
  data = iter(pipeline.build_train_dataset(config.data, seed=0, global_batch_size=8))
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  ckpt.save(0, {"params": params, "step": 0}, data, config)
  ckpt.close()


@pytest.fixture(scope="module")
def tiny_run(tiny_workdir):
  return runs.load_run(tiny_workdir)


def test_encode_once_matches_reencoding(tiny_run, monkeypatch):
  calls = []
  real = evaluation.encode_images
  monkeypatch.setattr(evaluation, "encode_images", lambda *a: calls.append(1) or real(*a))
  run = tiny_run
  once = evaluation.evaluate(run.graphdef, run.params, run.config, run.spec, BUDGETS, run.mesh,
                           progress=False, encode_once=True)
  encodes_once = len(calls)
  again = evaluation.evaluate(run.graphdef, run.params, run.config, run.spec, BUDGETS, run.mesh,
                            progress=False, encode_once=False)
  assert encodes_once == 2                                        # 64 examples / batch 32
  assert len(calls) - encodes_once == 2 * len(BUDGETS)            # once per batch and budget
  assert once["num_examples"] == again["num_examples"] == 64
  assert once["budgets"] == again["budgets"]                      # exact match, per family
  for b in map(str, BUDGETS):
    np.testing.assert_allclose(once["token_metrics"][b]["loss"], again["token_metrics"][b]["loss"],
                               rtol=1e-6)
    assert once["token_metrics"][b]["token_accuracy"] == again["token_metrics"][b]["token_accuracy"]
  # Different budgets feed different visual tokens: the losses must differ.
  assert len({round(m["loss"], 6) for m in once["token_metrics"].values()}) == len(BUDGETS)


def test_load_run_restores_trained_params(tiny_workdir, tiny_run):
  """Evaluating the restored checkpoint reproduces train.py's final eval (same params)."""
  with open(os.path.join(tiny_workdir, "eval.json")) as f:
    trained = json.load(f)
  assert tiny_run.step == 3 and tiny_run.method == "parcel"
  assert tiny_run.spec.budgets == (16, 24, 64, 100)
  assert tiny_run.config.model.decoder.vocab_size > 0          # filled by validate_config
  budgets = tuple(int(b) for b in trained["budgets"])
  result = evaluation.evaluate(tiny_run.graphdef, tiny_run.params, tiny_run.config, tiny_run.spec,
                             budgets, tiny_run.mesh, progress=False)
  assert result["budgets"] == trained["budgets"]
  for b in trained["token_metrics"]:
    np.testing.assert_allclose(result["token_metrics"][b]["loss"], trained["token_metrics"][b]["loss"],
                               rtol=1e-6)


def test_load_run_missing_paths(tmp_path):
  missing = tmp_path / "nope"
  with pytest.raises(FileNotFoundError, match=str(missing)):
    runs.load_run(str(missing))
  with pytest.raises(FileNotFoundError, match=str(tmp_path / "checkpoints")):
    runs.load_run(str(tmp_path))


def test_retention():
  assert evaluation.retention({"overall": 0.45, "detail": 0.1}, {"overall": 0.9, "detail": 0.0}) == {
      "overall": 50.0, "detail": None}


@pytest.fixture(scope="module")
def baselines(tiny_run, tmp_path_factory):
  """M3 and uncompressed ('none') checkpoints. Neither has connector parameters, so they
  reuse the PARCEL run's ViT, projection and decoder (no init to compile)."""
  root = tmp_path_factory.mktemp("baselines")
  shared = {k: v for k, v in tiny_run.params.items() if k != "connector"}
  for method in ("m3", "none"):
    write_checkpoint(tiny_config(method), shared, str(root / method))
  return str(root / "m3"), str(root / "none")


def test_report_retention_and_flops(tiny_workdir, baselines, tmp_path, monkeypatch):
  """The report's arithmetic with non-zero scores: evaluate() is replaced by one that scores
  B / 512 (reference: 0.5 at B = 256), so retention is 100 B / 256 per family."""
  def fake(graphdef, params, config, spec, budgets, mesh, **kw):
    row = lambda b: {"overall": b / 512, "detail": b / 1024}
    return {"method": spec.method, "num_examples": config.eval.num_examples,
            "budgets": {str(b): row(b) for b in budgets},
            "token_metrics": {str(b): {"loss": 1.0, "token_accuracy": b / 256} for b in budgets}}

  monkeypatch.setattr(evaluation, "evaluate", fake)
  m3_dir, ref_dir = baselines
  report = evaluation.evaluate_workdirs([tiny_workdir, m3_dir], budgets=[16, 24, 100], reference=ref_dir,
                                      out=str(tmp_path), num_examples=8, progress=False)
  parcel, m3 = report["runs"]
  assert list(parcel["budgets"]) == ["16", "24", "100"] and list(m3["budgets"]) == ["16"]
  for run in (parcel, m3):
    for b, row in run["budgets"].items():
      assert row["retention"] == pytest.approx({"overall": 100 * int(b) / 256, "detail": 100 * int(b) / 256})
      assert row["token_accuracy_retention"] == pytest.approx(100 * int(b) / 256)
  config = runs.load_run(tiny_workdir).config
  assert parcel["budgets"]["24"]["flops"] == flops.cost(config, 24)
  assert parcel["budgets"]["24"]["flops"]["connector"] > 0             # queries
  assert parcel["budgets"]["16"]["flops"]["connector"] == 0            # pure pooling
  assert parcel["budgets"]["100"]["flops"]["head"] > 0                 # vocab_size was filled
  assert (parcel["budgets"]["24"]["trained"], parcel["budgets"]["100"]["trained"]) == (True, True)
  assert report["reference"]["flops"]["total"] > parcel["budgets"]["100"]["flops"]["total"]
  assert os.path.isfile(tmp_path / "pareto.png")


def test_cli_two_runs_and_reference(tiny_workdir, baselines, tmp_path):
  m3_dir, ref_dir = baselines
  out = tmp_path / "out"
  proc = run_cli("parcel_jax.evaluate", f"--workdir={tiny_workdir}", f"--workdir={m3_dir}",
                 f"--reference={ref_dir}", "--budgets=16,24", "--num_examples=32", f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "wrote" in proc.stdout and "eval batch 1/1" in proc.stderr   # progress is logged
  with open(out / "budgets.json") as f:
    report = json.load(f)
  ref = report["reference"]
  assert ref["budget"] == 256 and report["num_examples"] == 32
  parcel, m3 = report["runs"]
  assert (parcel["method"], m3["method"]) == ("parcel", "m3")
  assert list(parcel["budgets"]) == ["16", "24"]
  assert list(m3["budgets"]) == ["16"]                               # 24 is not an M3 square
  for run in (parcel, m3):
    for row in run["budgets"].values():
      assert set(row["retention"]) == set(row["score"])               # overall and every family
      for family, value in row["retention"].items():
        ref_score = ref["score"][family]
        assert value == (pytest.approx(100 * row["score"][family] / ref_score) if ref_score else None)
      assert "token_accuracy_retention" in row
      assert row["flops"]["total"] > 0 and row["flops"]["head"] > 0
  with Image.open(out / "pareto.png") as im:
    assert im.format == "PNG" and im.size[0] > 300
    im.verify()
