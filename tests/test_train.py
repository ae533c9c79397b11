"""End-to-end training: compile count per bucket, exact resume, baselines' budget spaces."""

import json
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest

from parcel_jax import budgets as B
from parcel_jax import train
from tests.util import tiny_config


def read_metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def restore_params(workdir):
  mngr = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  state = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  mngr.close()
  return state["state"]["params"]


def test_compiles_once_per_bucket(tmp_path):
  # Budgets spanning 3 buckets (4x4+0q, 4x4+46q, 8x8+64q), sampled over 12 steps.
  config = tiny_config(**{"train.num_steps": 12, "model.connector.budgets": (16, 20, 40, 62, 66, 100, 128),
                          "eval.budgets": (16, 128)})
  train.train_and_evaluate(config, str(tmp_path))
  records = read_metrics(str(tmp_path))
  spec = B.BudgetSpec.from_config(config.model.connector, 16)
  assert len({r["budget"] for r in records}) > len(spec.buckets)  # many distinct budgets ...
  assert records[-1]["compiled_programs"] <= len(spec.buckets)    # ... few compiled programs
  assert records[-1]["compiled_programs"] == len({r["bucket"] for r in records})


def test_resume_is_exact(tmp_path):
  overrides = {"train.num_steps": 6, "model.connector.budgets": (16, 40, 64, 100), "eval.budgets": (16,)}
  straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
  train.train_and_evaluate(tiny_config(**overrides), straight)
  result = train.train_and_evaluate(tiny_config(**overrides, **{"train.stop_at": 2}), split)
  assert result == {"stopped_at": 2}
  train.train_and_evaluate(tiny_config(**overrides), split)   # resumes from step 2
  a, b = read_metrics(straight), read_metrics(split)
  assert [r["step"] for r in b] == list(range(1, 7))
  assert [r["data_fingerprint"] for r in a] == [r["data_fingerprint"] for r in b]
  assert [r["budget"] for r in a] == [r["budget"] for r in b]
  assert [r["loss"] for r in a] == [r["loss"] for r in b]
  pa, pb = restore_params(straight), restore_params(split)
  import jax
  for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb)):
    np.testing.assert_array_equal(x, y)   # bitwise


@pytest.mark.parametrize("method,expected", [("m3", {"16", "64", "256"}), ("mqt", {"4", "16", "32", "64"})])
def test_baselines_train_and_evaluate_in_their_spaces(tmp_path, method, expected):
  budgets = (16, 64, 256) if method == "m3" else (4, 16, 32, 64)
  config = tiny_config(**{"train.num_steps": 3, "model.connector.method": method,
                          "model.connector.budgets": budgets})
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["method"] == method
  assert set(result["budgets"]) == expected
  with open(tmp_path / "eval.json") as f:
    saved = json.load(f)
  assert saved["budgets"] == result["budgets"]
  for row in saved["budgets"].values():
    assert 0.0 <= row["overall"] <= 1.0 and "detail" in row
