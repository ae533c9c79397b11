"""The example method (models/connectors/random_subset.py): one class in one file, used through
``model.connector.method=random_subset`` only; the registry, the budget space, the routing and the
FLOPs all come from its class."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from parcel_jax import budgets as B
from parcel_jax import evaluation, flops, runs, train
from parcel_jax.models import connectors as C
from parcel_jax.models.connectors import random_subset
from tests.conftest import run_cli
from tests.util import REPO, tiny_config

GRID, WIDTH = 16, 32


def test_no_other_module_names_it():
  """Adding the method took its own file: nothing else in the package refers to it."""
  package = os.path.join(REPO, "parcel_jax")
  naming = [os.path.relpath(os.path.join(root, f), REPO) for root, _, files in os.walk(package)
            for f in files if f.endswith(".py") and "random_subset" in open(os.path.join(root, f)).read()]
  assert naming == ["parcel_jax/models/connectors/random_subset.py"]


def test_registry_space_routing_and_flops_come_from_its_class():
  cls = random_subset.RandomSubset
  assert "random_subset" in B.METHODS and C.method_class("random_subset") is cls
  cfg = C.method_config("random_subset", grid_size=GRID)
  assert isinstance(cfg, random_subset.RandomSubsetConfig)
  space = cls.budget_space(cfg)
  assert space == tuple(range(2, 257, 2)) == B.budget_space("random_subset", GRID)
  budget = int(np.random.default_rng().choice(space))
  assert B.route("random_subset", budget, GRID) == cls.route(cfg, budget) == (0, budget)
  with pytest.raises(ValueError, match=r"method 'random_subset' \(odd\).*even integers 2\.\.256"):
    B.route("random_subset", budget + 1, GRID)
  config = tiny_config(**{"model.connector.method": "random_subset", "model.vision.image_size": 64,
                          "model.vision.patch_size": 4})
  assert flops.cost(config, budget)["connector"] == cls.flops(cfg, 0, budget, GRID * GRID, WIDTH) == 0
  spec = B.BudgetSpec.from_config(config.model.connector, GRID)
  assert spec.budgets == space and [b.anchor_grid for b in spec.buckets] == [0, 0, 0, 0]


def test_tokens_are_a_fixed_nested_subset_of_the_grid():
  rng = np.random.default_rng()
  seed = int(rng.integers(1 << 16))
  cfg = C.ConnectorConfig(method="random_subset", width=WIDTH, grid_size=GRID, subset_seed=seed)
  conn = C.make_connector(cfg, rngs=nnx.Rngs(0))
  assert not jax.tree.leaves(nnx.state(conn, nnx.Param))        # parameter-free
  x = jnp.asarray(rng.normal(size=(2, GRID, GRID, WIDTH)), jnp.float32)
  order = np.random.default_rng(seed).permutation(GRID * GRID)
  assert sorted(order.tolist()) == list(range(GRID * GRID))
  flat = np.asarray(x).reshape(2, GRID * GRID, WIDTH)
  budgets = jnp.asarray([40, 64])
  tokens, mask = conn(x, B.Bucket(0, 64), budgets)
  np.testing.assert_array_equal(mask.sum(1), [40, 64])
  np.testing.assert_array_equal(tokens[0, :40], flat[0, order[:40]])
  np.testing.assert_array_equal(tokens[1], flat[1, order[:64]])
  np.testing.assert_array_equal(tokens[0, 40:], 0.0)
  small, _ = conn(x, B.Bucket(0, 40), jnp.asarray([40, 40]))       # compact = prefix of padded
  np.testing.assert_array_equal(small[0], tokens[0, :40])
  other = C.make_connector(C.ConnectorConfig(method="random_subset", width=WIDTH, grid_size=GRID,
                                             subset_seed=seed + 1), rngs=nnx.Rngs(0))
  assert not np.array_equal(other(x, B.Bucket(0, 64), budgets)[0][1], tokens[1])


def test_trains_and_evaluates_through_the_config_override(tmp_path):
  config = tiny_config(**{"model.connector.method": "random_subset", "train.num_steps": 2,
                          "model.connector.budgets": (16, 64), "eval.budgets": (16, 64)})
  result = train.train_and_evaluate(config, str(tmp_path))
  assert result["method"] == "random_subset" and set(result["budgets"]) == {"16", "64"}
  run = runs.load_run(str(tmp_path))
  assert type(run.model.connector) is random_subset.RandomSubset and run.step == 2
  report = evaluation.evaluate_run(run, (16, 64), num_examples=32, progress=False)
  for b in ("16", "64"):
    row = report["budgets"][b]
    assert 0.0 <= row["score"]["overall"] <= 1.0 and np.isfinite(row["loss"])
    assert row["flops"]["connector"] == 0
  assert report["budgets"]["16"]["loss"] != report["budgets"]["64"]["loss"]   # the budget matters


def test_flops_cli_takes_the_method_as_an_override(tmp_path):
  model = {"vision": dict(image_size=64, patch_size=4, width=32, depth=1, mlp_dim=64, num_heads=2),
           "decoder": dict(vocab_size=64, width=32, depth=1, mlp_dim=64, num_heads=2, num_kv_heads=1,
                           head_dim=16),
           "connector": dict(method="parcel", routing="piecewise", mlp_dim=64)}
  path = tmp_path / "config.py"
  path.write_text(f"import ml_collections\n\ndef get_config():\n  return ml_collections.ConfigDict({{'model': {model!r}}})\n")
  proc = run_cli("parcel_jax.flops", f"--config={path}", "--budgets=16,256",
                 "--config.model.connector.method=random_subset")
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.strip().splitlines()
  assert lines[0].startswith("method=random_subset grid=16x16")
  assert [row.split()[:3] for row in lines[2:]] == [["16", "0", "16"], ["256", "0", "256"]]
  assert [float(row.split()[4]) for row in lines[2:]] == [0.0, 0.0]   # the connector column
