"""Budget spaces, routing, buckets and the sampler (parcel_jax/budgets.py)."""

import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from parcel_jax import budgets as B


def connector_cfg(method="parcel", **kw):
  c = dict(method=method, routing="piecewise", bank_size=0, budgets=(), query_bucket=64)
  c.update(kw)
  return ml_collections.ConfigDict(c)


@pytest.mark.parametrize("budget", range(16, 64, 2))
def test_parcel_route_low_regime(budget):
  assert B.route("parcel", budget, 16) == (16, budget - 16)


@pytest.mark.parametrize("budget", range(64, 257, 2))
def test_parcel_route_high_regime(budget):
  assert B.route("parcel", budget, 16) == (64, budget - 64)


def test_parcel_route_448px_three_regimes():
  for b in range(16, 1025, 2):
    expected = (16, b - 16) if b < 64 else (64, b - 64) if b < 256 else (256, b - 256)
    assert B.route("parcel", b, 32) == expected


@pytest.mark.parametrize("bad", [15, 17, 63, 255, 258, 0, -16, 2, 1024])
def test_parcel_route_rejects_out_of_space(bad):
  with pytest.raises(ValueError, match=r"method 'parcel'.*even integers 16\.\.256"):
    B.route("parcel", bad, 16)


@pytest.mark.parametrize("bad", [16.0, "64", None, True])
def test_route_rejects_non_integers(bad):
  with pytest.raises(ValueError, match="integers"):
    B.route("parcel", bad, 16)


def test_odd_budget_message_says_odd():
  with pytest.raises(ValueError, match=r"\(odd\)"):
    B.route("mqt", 33, 16)


def test_other_methods():
  assert B.budget_space("m3", 16) == (4, 16, 64, 256)
  assert B.budget_space("mqt", 16) == tuple(range(2, 257, 2))
  assert B.budget_space("none", 16) == (256,)
  assert B.route("m3", 64, 16) == (64, 0)
  assert B.route("mqt", 100, 16) == (0, 100)
  with pytest.raises(ValueError, match="method 'm3'.*4, 16, 64, 256"):
    B.route("m3", 32, 16)
  with pytest.raises(ValueError, match="unknown"):
    B.route("perceiver", 64, 16)


def test_fixed_routing_ablations():
  assert B.route("parcel", 200, 16, "fixed4x4") == (16, 184)
  assert B.route("parcel", 20, 16, "fixed4x4") == (16, 4)
  assert B.route("parcel", 100, 16, "fixed2x2") == (64, 36)
  with pytest.raises(ValueError):
    B.route("parcel", 32, 16, "fixed2x2")  # 64 anchors leave no room below 64


def test_buckets_cover_each_budget_with_enough_slots():
  for method in B.METHODS:
    spec = B.BudgetSpec.from_config(connector_cfg(method), 16)
    assert len(spec.buckets) <= 6
    for b in spec.budgets:
      anchors, queries = spec.route(b)
      bucket = spec.bucket(b)
      assert bucket.num_anchors == anchors and bucket.query_slots >= queries
      assert spec.compact_bucket(b).num_slots == b


def test_specialist_and_invalid_subset():
  spec = B.BudgetSpec.from_config(connector_cfg("m3", budgets=(16,)), 16)
  assert spec.budgets == (16,) and len(spec.buckets) == 1
  with pytest.raises(ValueError, match="model.connector.budgets"):
    B.BudgetSpec.from_config(connector_cfg("m3", budgets=(32,)), 16)


def test_sampler_is_pure_and_seed_dependent():
  spec = B.BudgetSpec.from_config(connector_cfg(), 16)
  seq = [B.sample_budget(spec, 7, s) for s in range(200)]
  assert seq == [B.sample_budget(spec, 7, s) for s in range(200)]
  assert seq != [B.sample_budget(spec, 8, s) for s in range(200)]
  assert set(seq) <= set(spec.budgets) and len(set(seq)) > 50


def test_sampler_same_sequence_in_two_processes():
  code = ("import ml_collections as mc; from parcel_jax import budgets as B; "
          "s=B.BudgetSpec.from_config(mc.ConfigDict(dict(method='parcel',routing='piecewise',"
          "bank_size=0,budgets=(),query_bucket=64)),16); "
          "print([B.sample_budget(s, {seed}, i) for i in range(64)])")
  runs = [subprocess.run([sys.executable, "-c", code.format(seed=seed)], check=True,
                         capture_output=True, text=True).stdout for seed in (3, 3, 4)]
  assert runs[0] == runs[1] and runs[0] != runs[2]


def test_sampler_is_roughly_uniform():
  spec = B.BudgetSpec.from_config(connector_cfg("m3"), 16)
  draws = np.array([B.sample_budget(spec, 0, s) for s in range(4000)])
  freq = np.array([(draws == b).mean() for b in spec.budgets])
  np.testing.assert_allclose(freq, 0.25, atol=0.03)


def test_per_example_mode_stays_in_one_bucket():
  spec = B.BudgetSpec.from_config(connector_cfg(), 16)
  seen = set()
  for step in range(50):
    bucket, vec = B.sample_step(spec, 1, step, 16, mode="per_example")
    assert vec.shape == (16,) and vec.dtype == np.int32
    assert all(spec.bucket(int(b)) == bucket for b in vec)
    seen.update(vec.tolist())
  assert len(seen) > 40
  bucket, vec = B.sample_step(spec, 1, 3, 8, mode="per_batch")
  assert len(set(vec.tolist())) == 1 and spec.bucket(int(vec[0])) == bucket


@pytest.mark.parametrize("mode", ["per_batch", "per_example"])
def test_ramp_opens_budgets_geometrically(mode):
  """Under ``ramp_steps`` every draw is <= the step's cap; the cap climbs from the smallest budget to
  the largest (x2 every ramp/4 steps over 16..256); from ramp_steps on the draws are the
  un-ramped ones exactly."""
  spec = B.BudgetSpec.from_config(connector_cfg(), 16)
  seed, ramp = int(np.random.default_rng().integers(1 << 30)), 400
  caps = [B.budget_cap(spec, s, ramp) for s in range(ramp + 1)]
  assert caps[0] == 16 and caps[-1] == 256 and caps == sorted(caps)
  assert caps[100] == 32 and caps[200] == 64 and caps[300] == 128  # 16 * 16 ** (s / 400)
  for step in range(0, ramp, 7):
    bucket, vec = B.sample_step(spec, seed, step, 8, mode=mode, ramp_steps=ramp)
    assert vec.max() <= caps[step], (seed, step)
    assert all(spec.bucket(int(b)) == bucket for b in vec)
  early = [B.sample_budget(spec, seed, s, ramp_steps=ramp) for s in range(100)]
  assert max(early) < 32 and len(set(early)) > 3  # small, but still sampled
  for step in range(ramp, ramp + 50):
    ramped = B.sample_step(spec, seed, step, 8, mode=mode, ramp_steps=ramp)
    plain = B.sample_step(spec, seed, step, 8, mode=mode)
    assert ramped[0] == plain[0] and np.array_equal(ramped[1], plain[1]), (seed, step)


def test_ramp_length_is_a_fraction_of_the_schedule():
  from configs import base
  c = base.get_config()
  assert B.ramp_steps(c) == round(c.budget.ramp_fraction * c.train.num_steps) > 0
  c.train.num_steps = 301
  c.budget.ramp_fraction = 0.25
  assert B.ramp_steps(c) == 75
  del c.budget["ramp_fraction"]  # a config saved before the field existed
  assert B.ramp_steps(c) == 0


def test_spaces_and_routes_are_the_methods_own():
  from parcel_jax.models import connectors as C
  for name in B.METHODS:
    cls, cfg = C.method_class(name), C.method_config(name, grid_size=16)
    space = cls.budget_space(cfg)
    assert B.space_of(cfg) == B.budget_space(name, 16) == space == tuple(sorted(space))
    budget = int(np.random.default_rng().choice(space))
    assert B.route(name, budget, 16) == B.route_of(cfg, budget) == cls.route(cfg, budget)
    assert sum(cls.route(cfg, budget)) == budget


def test_bank_size_caps_the_space_of_query_methods():
  spec = B.BudgetSpec.from_config(connector_cfg("mqt", bank_size=100), 16)
  assert spec.budgets == tuple(range(2, 101, 2)) and spec.method_cfg.bank_size == 100
  spec = B.BudgetSpec.from_config(connector_cfg("parcel", bank_size=100), 16)
  assert spec.budgets[-1] == 164 and spec.route(164) == (64, 100)
  with pytest.raises(ValueError, match="method 'mqt'.*for this configuration"):
    B.BudgetSpec.from_config(connector_cfg("mqt", bank_size=100), 16).route(102)


def test_routing_of_another_method_is_refused():
  with pytest.raises(ValueError, match=r"model.connector.routing='fixed4x4' is a field of method 'parcel', not of method 'm3'"):
    B.BudgetSpec.from_config(connector_cfg("m3", routing="fixed4x4"), 16)
  with pytest.raises(ValueError, match=r"model.connector.routing='diagonal' is unknown; allowed: piecewise"):
    B.validate_method("parcel", "diagonal")
