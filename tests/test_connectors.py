"""Connectors: pooling, nested queries, masking (parcel_jax/models/connectors.py)."""

import functools

import einops
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from parcel_jax import budgets as B
from parcel_jax.models import connectors as C
from tests.util import assert_rel_close

GRID, WIDTH = 16, 32


def make(method, **kw):
  cfg = C.ConnectorConfig(method=method, width=WIDTH, grid_size=GRID, num_heads=4, mlp_dim=64, **kw)
  seed = int(np.random.SeedSequence().generate_state(1)[0])
  return C.make_connector(cfg, rngs=nnx.Rngs(seed)), cfg


@functools.partial(jax.jit, static_argnums=(0, 4))
def _apply(graphdef, state, x, budgets, bucket):
  return nnx.merge(graphdef, state)(x, bucket, budgets)


def run(conn, x, bucket, budgets):
  """Jitted connector call (eager NNX is slow); bucket is static like in training."""
  graphdef, state = nnx.split(conn)
  return _apply(graphdef, state, x, jnp.asarray(budgets), bucket)


def features(batch=2):
  rng = np.random.default_rng()
  return jnp.asarray(rng.normal(size=(batch, GRID, GRID, WIDTH)), jnp.float32)


def spec_for(method, routing="piecewise"):
  import ml_collections
  return B.BudgetSpec.from_config(ml_collections.ConfigDict(dict(
      method=method, routing=routing, bank_size=0, budgets=(), query_bucket=64)), GRID)


def numpy_pool(x, out):
  k = x.shape[1] // out
  b, _, _, d = x.shape
  return x.reshape(b, out, k, out, k, d).mean(axis=(2, 4)).reshape(b, out * out, d)


@pytest.mark.parametrize("out", [1, 2, 4, 8, 16])
def test_avg_pool_matches_numpy(out):
  x = features()
  np.testing.assert_allclose(C.avg_pool(x, out), numpy_pool(np.asarray(x), out), rtol=1e-6, atol=1e-6)


def test_m3_levels_nest():
  x = features()
  m3, _ = make("m3")
  via_8 = C.avg_pool(einops.rearrange(C.avg_pool(x, 8), "b (h w) d -> b h w d", h=8), 4)
  direct, mask = run(m3, x, B.Bucket(4, 0), jnp.full((2,), 16))
  np.testing.assert_allclose(via_8, direct, rtol=1e-6, atol=1e-6)
  assert mask.all() and direct.shape == (2, 16, WIDTH)


def test_m3_rejects_indivisible_grid():
  with pytest.raises(ValueError, match="cannot average-pool a 16x16"):
    C.avg_pool(features(), 3)


@pytest.mark.parametrize("key_mode", ["content+pos", "pos_only"])
def test_mqt_nested_prefix(key_mode):
  mqt, _ = make("mqt", key_mode=key_mode)
  x = features()
  big, big_mask = run(mqt, x, B.Bucket(0, 128), jnp.full((2,), 100))
  for k in (2, 16, 64, 100):
    small, small_mask = run(mqt, x, B.Bucket(0, k), jnp.full((2,), k))
    assert_rel_close(big[:, :k], small)
    assert small_mask.all()
  assert big_mask[:, :100].all() and not big_mask[:, 100:].any()
  np.testing.assert_array_equal(big[:, 100:], 0.0)


@pytest.mark.parametrize("method,options", [
    ("parcel", {}), ("parcel", {"conditioning": "none"}), ("parcel", {"conditioning": "dual_cross"}),
    ("parcel", {"routing": "fixed4x4"}), ("parcel", {"key_pos": "learned", "anchor_pos": "none"}),
    ("mqt", {}), ("mqt", {"extra_self_attn": True})])
def test_bucketed_equals_compact(method, options):
  conn, cfg = make(method, **options)
  spec = spec_for(method, cfg.routing)
  x = features(3)
  for budget in (spec.budgets[1], 62 if 62 in spec.budgets else spec.budgets[2], spec.budgets[-1]):
    bucket = spec.bucket(budget)
    compact = spec.compact_bucket(budget)
    padded, pmask = run(conn, x, bucket, jnp.full((3,), budget))
    exact, emask = run(conn, x, compact, jnp.full((3,), budget))
    assert int(pmask[0].sum()) == budget and emask.all() and exact.shape[1] == budget
    assert_rel_close(padded[:, :budget], exact)
    np.testing.assert_array_equal(padded[:, budget:], 0.0)


def test_parcel_emits_raw_anchors_then_queries():
  conn, _ = make("parcel")
  x = features()
  tokens, mask = run(conn, x, B.Bucket(8, 64), jnp.array([100, 128]))
  np.testing.assert_allclose(tokens[:, :64], numpy_pool(np.asarray(x), 8), rtol=1e-6, atol=1e-6)
  assert mask.sum(1).tolist() == [100, 128]
  pure, pmask = run(conn, x, B.Bucket(4, 0), jnp.array([16, 16]))
  np.testing.assert_allclose(pure, numpy_pool(np.asarray(x), 4), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["parcel", "mqt"])
def test_masked_query_slots_get_zero_gradient(method):
  conn, _ = make(method)
  graphdef, params = nnx.split(conn)
  x = features()
  anchors = 64 if method == "parcel" else 0
  active = 40

  def loss(p):
    out, _ = nnx.merge(graphdef, p)(x, B.Bucket(8 if anchors else 0, 64), jnp.full((2,), anchors + active))
    return jnp.sum(jnp.sin(out))

  grads = jax.grad(loss)(params)
  bank_grad = np.asarray(grads["resampler"]["bank"][...])
  assert np.all(bank_grad[active:] == 0.0)
  assert np.all(np.abs(bank_grad[:active]).sum(-1) > 0)


def test_per_example_budgets_in_one_bucket():
  conn, _ = make("parcel")
  x = features(3)
  budgets = jnp.array([70, 100, 128])
  tokens, mask = run(conn, x, B.Bucket(8, 64), budgets)
  for i, b in enumerate([70, 100, 128]):
    single, _ = run(conn, x[i:i + 1], B.Bucket(8, b - 64), jnp.array([b]))
    assert_rel_close(tokens[i:i + 1, :b], single)
  assert mask.sum(1).tolist() == [70, 100, 128]


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="model.connector.conditioning"):
    C.ConnectorConfig(method="parcel", width=32, grid_size=16, conditioning="bogus")
  with pytest.raises(ValueError, match="model.connector.method"):
    C.ConnectorConfig(method="qformer", width=32, grid_size=16)
  with pytest.raises(ValueError, match="num_heads"):
    C.ConnectorConfig(method="parcel", width=30, grid_size=16, num_heads=4)
  conn, _ = make("parcel")
  with pytest.raises(ValueError, match=r"features \(batch, 16, 16, 32\)"):
    conn(jnp.zeros((1, 8, 8, WIDTH)), B.Bucket(4, 0), jnp.array([16]))
