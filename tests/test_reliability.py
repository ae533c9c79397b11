"""Preemption, crashes, numerical faults and config validation lose nothing."""

import glob
import os
import random
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parcel_jax import config as config_lib
from parcel_jax import state as state_lib
from parcel_jax import train_step as train_step_lib
from parcel_jax import train
from parcel_jax.data import pipeline
from tests.test_train import read_metrics, restore_params
from tests.util import cli_overrides, tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = {"train.num_steps": 8, "model.connector.budgets": (16, 64), "eval.budgets": (16,),
       "train.checkpoint_every": 1}


def start(workdir, **overrides):
  cmd = [sys.executable, "-m", "parcel_jax.train", "--config=configs/base.py", f"--workdir={workdir}",
         *cli_overrides(**{**RUN, **overrides})]
  return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def committed_steps(workdir):
  return sorted(int(os.path.basename(p)) for p in glob.glob(os.path.join(workdir, "checkpoints", "*"))
                if os.path.basename(p).isdigit())


def saving_now(workdir):
  return bool(glob.glob(os.path.join(workdir, "checkpoints", "*tmp*")))


def wait_for(predicate, proc, timeout=240):
  end = time.time() + timeout
  while time.time() < end:
    if predicate():
      return True
    if proc.poll() is not None:
      return False
    time.sleep(0.02)
  raise TimeoutError("trainer did not reach the expected state")


def test_sigkill_at_random_points_then_resume_matches_uninterrupted(tmp_path):
  reference, crashed = str(tmp_path / "reference"), str(tmp_path / "crashed")
  assert start(reference).wait(timeout=600) == 0
  rng = random.Random()
  kills = 0
  # Kill 1: while an async save is in flight; kills 2-3: after a random committed step.
  for attempt in range(3):
    proc = start(crashed)
    if attempt == 0:
      reached = wait_for(lambda: saving_now(crashed), proc)
    else:
      target = min((committed_steps(crashed) or [0])[-1] + rng.randint(1, 2), RUN["train.num_steps"] - 1)
      reached = wait_for(lambda: (committed_steps(crashed) or [0])[-1] >= target, proc)
    if reached and proc.poll() is None:
      proc.send_signal(signal.SIGKILL)
      kills += 1
    proc.wait(timeout=60)
  assert kills >= 3
  proc = start(crashed)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  ref, got = restore_params(reference), restore_params(crashed)
  for x, y in zip(jax.tree.leaves(ref), jax.tree.leaves(got)):
    np.testing.assert_array_equal(x, y)
  assert os.path.exists(os.path.join(crashed, "eval.json"))


def test_sigterm_checkpoints_current_step_and_exits_3(tmp_path):
  workdir = str(tmp_path)
  proc = start(workdir, **{"train.num_steps": 10_000, "train.checkpoint_every": 10_000})
  metrics = os.path.join(workdir, "metrics.jsonl")
  wait_for(lambda: os.path.exists(metrics) and len(open(metrics).readlines()) >= 3, proc)
  sent = time.time()
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=60)
  elapsed = time.time() - sent
  assert proc.returncode == train.PREEMPTED_EXIT_CODE, err[-3000:]
  assert elapsed < 30   # documented: the current step, one save, then exit
  last_logged = read_metrics(workdir)[-1]["step"]
  assert committed_steps(workdir)[-1] == last_logged
  assert not saving_now(workdir)


def test_incomplete_checkpoint_is_ignored_with_a_warning(tmp_path, caplog):
  config = tiny_config(**{**RUN, "train.num_steps": 2})
  train.train_and_evaluate(config, str(tmp_path))
  partial = tmp_path / "checkpoints" / "3.orbax-checkpoint-tmp-1234"
  partial.mkdir()
  (partial / "junk").write_text("half written")
  config = tiny_config(**{**RUN, "train.num_steps": 3})
  from absl import logging as absl_logging
  with caplog.at_level("WARNING"):
    train.train_and_evaluate(config, str(tmp_path))
  assert any("incomplete checkpoint" in r.getMessage() and "3.orbax-checkpoint-tmp" in r.getMessage()
             for r in caplog.records)
  assert committed_steps(str(tmp_path))[-1] == 3
  del absl_logging


@pytest.fixture
def nan_at_step_3(monkeypatch):
  """Poisons the images of the third training batch (a Grain map, so checkpointing still works)."""
  real = pipeline.build_train_dataset
  seen = {"batches": 0}

  def poison(batch):
    seen["batches"] += 1
    if seen["batches"] == 3:
      batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
    return batch

  monkeypatch.setattr(pipeline, "build_train_dataset", lambda *a, **k: real(*a, **k).map(poison))


def test_nan_batch_is_skipped(tmp_path, nan_at_step_3):
  config = tiny_config(**{**RUN, "train.num_steps": 5, "train.checkpoint_every": 1000})
  train.train_and_evaluate(config, str(tmp_path))
  records = read_metrics(str(tmp_path))
  assert [r["nonfinite"] for r in records] == [0, 0, 1, 0, 0]
  assert records[-1]["nonfinite_steps"] == 1
  params = restore_params(str(tmp_path))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_nan_batch_stops_with_checkpoint_intact(tmp_path, nan_at_step_3):
  config = tiny_config(**{**RUN, "train.num_steps": 5, "train.checkpoint_every": 2,
                          "train.on_nonfinite": "stop"})
  with pytest.raises(FloatingPointError, match="non-finite loss or gradient at step 3"):
    train.train_and_evaluate(config, str(tmp_path))
  assert committed_steps(str(tmp_path)) == [2]
  params = restore_params(str(tmp_path))
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_nonfinite_step_leaves_state_untouched():
  config = tiny_config(**RUN)
  model_cfg, spec = config_lib.validate_config(config)
  from parcel_jax import sharding
  mesh = sharding.make_mesh((-1, 1, 1))
  graphdef, tx, params, opt_state = state_lib.init_state(model_cfg, config.optim, 4, mesh, 0)
  batch = next(iter(pipeline.build_train_dataset(config.data, seed=0, global_batch_size=8)))
  batch.pop("family")
  batch["image"][0, 0, 0, 0] = np.inf
  step = jax.jit(train_step_lib.make_train_step(graphdef, tx, accum_steps=1), static_argnames="bucket")
  before = jax.tree.map(np.asarray, (params, opt_state))
  new_params, new_opt, m = step(params, opt_state, batch, jnp.full((8,), 64), bucket=spec.bucket(64))
  assert float(m["nonfinite"]) == 1.0
  for x, y in zip(jax.tree.leaves(before), jax.tree.leaves((new_params, new_opt))):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("overrides,message", [
    ({"model.connector.method": "qformer"}, r"model.connector.method='qformer' is unknown; allowed: parcel, m3, mqt, none"),
    ({"model.connector.budgets": (16, 33)}, r"model.connector.budgets has \[33\] outside the space of method 'parcel'"),
    ({"model.vision.image_size": 60}, r"parcel needs a feature grid divisible by 4.*grid 15"),
    ({"model.vision.image_size": 62}, r"model.vision.image_size=62 is not divisible by model.vision.patch_size=4"),
    ({"model.connector.method": "m3", "model.connector.budgets": (16, 32)}, r"outside the space of method 'm3'"),
    ({"mesh.shape": (3, 1, 1)}, r"mesh.shape=\(3, 1, 1\) uses 3 devices but 1 are available"),
    ({"mesh.shape": (2, -1, 1)}, r"mesh.shape=\(2, -1, 1\) does not divide the 1 available devices"),
    ({"budget.sampling": "per_token"}, r"budget.sampling='per_token' is unknown"),
    ({"eval.budgets": (3, 5)}, r"eval.budgets=\(3, 5\) has no budget of method 'parcel'"),
    ({"budget.ramp_fraction": 1.5}, r"budget.ramp_fraction=1.5 must be in \[0, 1\]"),
    ({"train.host_malloc": "jemalloc"}, r"train.host_malloc='jemalloc' is unknown; allowed: auto, reuse, system"),
])
def test_config_errors_name_the_field(tmp_path, overrides, message):
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(tiny_config(**overrides), str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")  # failed before anything was built


def test_batch_not_divisible_by_data_shards():
  class FakeMesh:
    shape = {"data": 2, "fsdp": 3, "tensor": 1}
  with pytest.raises(ValueError, match=r"train.batch_size=8 is not divisible by the 6 data shards"):
    config_lib.check_batch_divisible(tiny_config(), FakeMesh())


def test_checkpoint_of_another_model_is_refused(tmp_path):
  train.train_and_evaluate(tiny_config(**{**RUN, "train.num_steps": 1}), str(tmp_path))
  with pytest.raises(ValueError, match=r"another model.*model.vision.width: checkpoint 32, config 64"):
    train.train_and_evaluate(tiny_config(**{**RUN, "train.num_steps": 2, "model.vision.width": 64,
                                            "model.vision.num_heads": 2}), str(tmp_path))
  assert committed_steps(str(tmp_path)) == [1]   # the old checkpoint is untouched
