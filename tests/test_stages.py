"""The two-stage recipe: stage 2 starts from stage 1's backbone with a fresh connector."""

import json
import os

import jax
import numpy as np
import pytest

from parcel_jax import runs
from parcel_jax import sharding
from parcel_jax import stages
from parcel_jax import state as state_lib
from parcel_jax import train
from tests.test_train import read_metrics, restore_params
from tests.util import tiny_config

STAGE1 = {"train.num_steps": 3, "model.connector.method": "none", "eval.budgets": (256,),
          "eval.num_examples": 32}
STAGE2 = {"train.num_steps": 4, "model.connector.budgets": (16, 64), "eval.budgets": (16,),
          "eval.num_examples": 32}


@pytest.fixture(scope="module")
def stage1(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("stage1"))
  train.train_and_evaluate(tiny_config(**STAGE1), workdir)
  return workdir


def _leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)}


def test_stage2_starts_from_stage1_backbone_and_a_fresh_connector(stage1):
  config = tiny_config(**STAGE2, **{"init.stage1_workdir": stage1, "seed": 7})
  model_cfg, _ = runs.config_lib.validate_config(config)
  mesh = sharding.make_mesh(config.mesh.shape)
  rules = sharding.rules_from_config(config.mesh)
  _, fresh = state_lib.init_params(model_cfg, mesh, config.seed, rules)
  started = stages.load_backbone(config, fresh, mesh, rules)
  final1 = _leaves(runs.load_run(stage1).params)
  got, init = _leaves(started), _leaves(fresh)
  backbone = [p for p in got if not p.startswith("['connector']")]
  assert set(backbone) == set(final1) and len(backbone) > 10
  for p in backbone:
    np.testing.assert_array_equal(got[p], final1[p])   # bitwise stage 1's final parameters
  connector = [p for p in got if p.startswith("['connector']")]
  assert connector
  for p in connector:
    np.testing.assert_array_equal(got[p], init[p])     # the fresh initialisation (seed 7) ...
  # ... not a copy of anything stage 1 trained: the backbone did move in stage 1.
  _, init1 = state_lib.init_params(runs.load_run(stage1).model_cfg, mesh, 0, rules)
  moved = [p for p, x in _leaves(init1).items() if not np.array_equal(x, final1[p])]
  assert len(moved) > len(final1) // 2


def test_stage2_resume_is_exact(stage1, tmp_path):
  overrides = {**STAGE2, "init.stage1_workdir": stage1}
  straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
  train.train_and_evaluate(tiny_config(**overrides), straight)
  assert train.train_and_evaluate(tiny_config(**overrides, **{"train.stop_at": 2}), split) == {"stopped_at": 2}
  train.train_and_evaluate(tiny_config(**overrides), split)  # resumes at step 2, stage 1 untouched
  a, b = read_metrics(straight), read_metrics(split)
  assert [r["loss"] for r in a] == [r["loss"] for r in b] and len(a) == 4
  for x, y in zip(jax.tree.leaves(restore_params(straight)), jax.tree.leaves(restore_params(split))):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("override,field", [({"model.decoder.width": 96}, "model.decoder.width"),
                                            ({"model.vision.depth": 2}, "model.vision.depth")])
def test_another_backbone_is_refused_naming_the_field(stage1, tmp_path, override, field):
  config = tiny_config(**STAGE2, **override, **{"init.stage1_workdir": stage1})
  with pytest.raises(ValueError, match=rf"init.stage1_workdir={stage1}.*{field}"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints" / "0")


def test_missing_stage1_and_conflicting_fields_are_named(tmp_path):
  missing = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="init.stage1_workdir="):
    train.train_and_evaluate(tiny_config(**STAGE2, **{"init.stage1_workdir": missing}), str(tmp_path / "a"))
  with pytest.raises(ValueError, match="init.stage1_workdir and train.stage1_steps"):
    train.train_and_evaluate(tiny_config(**STAGE2, **{"init.stage1_workdir": missing,
                                                      "train.stage1_steps": 2}), str(tmp_path / "b"))
  with pytest.raises(ValueError, match="train.stage1_steps"):
    train.train_and_evaluate(tiny_config(**STAGE2, **{"train.stage1_steps": -1}), str(tmp_path / "c"))


def test_one_command_runs_both_stages_and_a_restart_skips_stage1(tmp_path):
  workdir = str(tmp_path)
  config = tiny_config(**STAGE2, **{"train.stage1_steps": 2})
  result = train.train_and_evaluate(config, workdir)
  assert set(result["budgets"]) == {"16"}
  stage1_dir = os.path.join(workdir, "stage1")
  with open(os.path.join(stage1_dir, "eval.json")) as f:
    assert json.load(f)["method"] == "none"
  assert [r["step"] for r in read_metrics(stage1_dir)][-1] == 2
  step, saved = runs.saved_config(workdir)
  assert step == 4 and saved["init"]["stage1_workdir"] == stage1_dir
  assert saved["model"]["connector"]["method"] == "parcel"
  mtime = os.path.getmtime(os.path.join(stage1_dir, "eval.json"))
  train.train_and_evaluate(tiny_config(**STAGE2, **{"train.stage1_steps": 2}), workdir)  # all done
  assert os.path.getmtime(os.path.join(stage1_dir, "eval.json")) == mtime


def test_stage1_config_drops_stage2_connector_settings():
  # Method-specific connector fields set for stage 2 are not stage 1's: stage 1 (method none)
  # gets their defaults and validates; stage 2 keeps them.
  overrides = {"model.connector.method": "parcel", "model.connector.query_prior": "local",
               "model.connector.query_prior_sigma": 0.5, "model.connector.fetch_init": True,
               "train.stage1_steps": 2}
  config = tiny_config(**STAGE2, **overrides)
  runs.config_lib.validate_config(config)  # as train does first: fills the preset sizes
  first = stages.stage1_config(config)
  runs.config_lib.validate_config(first)
  defaults = tiny_config()
  for name in ("query_prior", "query_prior_sigma", "fetch_init"):
    assert first.model.connector[name] == defaults.model.connector[name]
  assert first.model.connector.method == "none" and first.train.num_steps == 2
  assert config.model.connector.query_prior == "local" and config.model.connector.fetch_init
