"""Connectors: pooling, nested queries, masking, per-method configs, the registry (parcel_jax/models/connectors/)."""

import dataclasses
import functools

import einops
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from parcel_jax import budgets as B
from parcel_jax.models import connectors as C
from parcel_jax.models.connectors import base
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


@pytest.mark.parametrize("key_mode,prior", [("content+pos", "none"), ("pos_only", "none"),
                                            ("content+pos", "local")])
def test_mqt_nested_prefix(key_mode, prior):
  mqt, _ = make("mqt", key_mode=key_mode, query_prior=prior)
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
    ("parcel", {"query_prior": "local"}), ("mqt", {}), ("mqt", {"extra_self_attn": True}),
    ("mqt", {"query_prior": "local"})])
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


# ------------------------------------------------------------- configs: each method its own fields

def test_each_method_config_holds_only_what_it_reads():
  names = lambda cfg: {f.name for f in dataclasses.fields(cfg)} - set(base.MODEL_FIELDS)
  parcel = C.method_config("parcel", grid_size=GRID, routing="fixed4x4", key_mode="pos_only")
  mqt = C.method_config("mqt", grid_size=GRID, key_mode="pos_only", extra_self_attn=True)
  m3 = C.method_config("m3", grid_size=GRID, extra_self_attn=True)
  assert (parcel.routing, parcel.key_mode, mqt.key_mode, mqt.extra_self_attn) == ("fixed4x4", "pos_only", "pos_only", True)
  assert {"routing", "conditioning", "anchor_pos"} <= names(parcel) and "extra_self_attn" not in names(parcel)
  assert "extra_self_attn" in names(mqt) and not {"routing", "conditioning", "anchor_pos"} & names(mqt)
  assert names(m3) == {"num_heads", "extra_self_attn"}
  assert names(C.method_config("none", grid_size=GRID)) == set()
  flat = {f.name for f in dataclasses.fields(C.ConnectorConfig)}
  for name in C.method_names():   # the flat section is exactly the union of the methods' fields
    assert names(C.method_config(name, grid_size=GRID)) <= flat


@pytest.mark.parametrize("method,field,value,owners", [
    ("mqt", "routing", "fixed4x4", "'parcel'"),
    ("mqt", "conditioning", "none", "'parcel'"),
    ("m3", "key_mode", "pos_only", "'parcel' / 'mqt'"),
    ("parcel", "extra_self_attn", True, "'m3' / 'mqt'"),
    ("none", "bank_size", 64, "'parcel' / 'mqt'"),
    ("parcel", "subset_seed", 3, "'random_subset'"),
])
def test_a_field_of_another_method_is_refused(method, field, value, owners):
  with pytest.raises(ValueError, match=rf"model.connector.{field}={value!r} is a field of method "
                                        rf"{owners}, not of method '{method}'"):
    C.ConnectorConfig(method=method, width=WIDTH, grid_size=GRID, num_heads=4, **{field: value})
  default = {f.name: f.default for f in dataclasses.fields(C.ConnectorConfig)}[field]
  assert C.ConnectorConfig(method=method, width=WIDTH, grid_size=GRID, num_heads=4, **{field: default})


def test_flat_overrides_reach_the_method_and_wrong_ones_name_it():
  from parcel_jax import config as config_lib
  from tests.conftest import tiny_config
  model_cfg, spec = config_lib.validate_config(tiny_config(routing="fixed4x4", budgets=()))
  assert model_cfg.connector.method_config().routing == "fixed4x4"
  assert spec.route(200) == (16, 184) and spec.budgets == tuple(range(16, 257, 2))
  with pytest.raises(ValueError, match=r"model.connector.routing='fixed4x4' is a field of method 'parcel', "
                                        r"not of method 'mqt' \(which reads .*key_mode"):
    config_lib.validate_config(tiny_config("mqt", routing="fixed4x4"))


def test_shared_sizes_are_ignored_by_a_method_without_them():
  heads, mlp = (int(v) for v in np.random.default_rng().integers(1, 99, size=2))
  cfg = C.ConnectorConfig(method="none", width=WIDTH, grid_size=GRID, num_heads=heads, mlp_dim=mlp)
  assert cfg.method_config() == C.method_config("none", grid_size=GRID, width=WIDTH)
  assert C.ConnectorConfig(method="m3", width=48, grid_size=GRID, mlp_dim=mlp).method_config().num_heads == 12


def test_registry_refuses_an_incomplete_or_duplicate_method():
  class NoFlops(base.Connector):
    name = "no_flops"
    budget_space = classmethod(lambda cls, cfg: (4,))
    route = classmethod(lambda cls, cfg, b: (b, 0))
    def __call__(self, features, bucket, budgets):
      return features

  with pytest.raises(TypeError, match="'no_flops'.*does not define flops"):
    base.register(NoFlops)

  class Twice(NoFlops):
    name = "parcel"
    flops = classmethod(lambda cls, cfg, n_p, n_q, n_v, d: 0)

  with pytest.raises(TypeError, match="'parcel' is defined twice"):
    base.register(Twice)
  assert "no_flops" not in C.method_names() and C.method_class("parcel") is C.Parcel


# Parameter paths and shapes (width 32, 4 heads, MLP 64, grid 16) of the connectors as they were
# when every method lived in one module: saved checkpoints restore by these paths.
_BLOCK = {"norm_q/scale": [32], "norm_q/bias": [32], "norm_kv/scale": [32], "norm_kv/bias": [32],
          **{f"attn/{x}_kernel": [32, 4, 8] for x in "qkv"}, **{f"attn/{x}_bias": [4, 8] for x in "qkv"},
          "attn/o_kernel": [4, 8, 32], "attn/o_bias": [32]}
_HEAD = {"mlp/wi": [32, 64], "mlp/bi": [64], "mlp/wo": [64, 32], "mlp/bo": [32], "mlp_norm/scale": [32],
         "mlp_norm/bias": [32], "out_norm/scale": [32], "out_norm/bias": [32]}


def _resampler(bank, blocks):
  return {"resampler/bank": [bank, 32], **{f"resampler/{k}": v for k, v in _HEAD.items()},
          **{f"resampler/{b}/{k}": v for b in blocks for k, v in _BLOCK.items()}}


@pytest.mark.parametrize("method,options,paths", [
    ("parcel", {}, _resampler(192, ("condition", "cross"))),
    ("parcel", {"routing": "fixed4x4"}, _resampler(240, ("condition", "cross"))),
    ("parcel", {"query_prior": "local"},
     {**_resampler(192, ("condition", "cross")), "resampler/log_prior_sigma": [4]}),
    ("mqt", {}, _resampler(256, ("cross",))),
    ("mqt", {"extra_self_attn": True}, _resampler(256, ("condition", "cross"))),
    ("m3", {"extra_self_attn": True}, {f"self_attn/{k}": v for k, v in _BLOCK.items()}),
    ("m3", {}, {}), ("none", {}, {}), ("random_subset", {}, {})])
def test_parameter_paths_are_those_checkpoints_hold(method, options, paths):
  cfg = C.ConnectorConfig(method=method, width=WIDTH, grid_size=GRID, num_heads=4, mlp_dim=64, **options)
  conn = nnx.eval_shape(lambda: C.make_connector(cfg, rngs=nnx.Rngs(0)))
  flat = nnx.to_flat_state(nnx.state(conn, nnx.Param))
  assert {"/".join(map(str, k)): list(v.shape) for k, v in flat} == paths
  assert C.method_class(method).bank_size(cfg.method_config()) == (paths.get("resampler/bank") or [0])[0]


def test_bank_sizes_follow_the_budget_space():
  assert C.Parcel.bank_size(C.method_config("parcel", grid_size=32)) == 768     # 448 px: 1024 - 256
  assert C.Parcel.bank_size(C.method_config("parcel", grid_size=16, routing="fixed2x2")) == 192
  assert C.Parcel.bank_size(C.method_config("parcel", grid_size=16, bank_size=100)) == 100
  assert B.budget_space("parcel", 16, bank_size=100) == tuple(range(16, 165, 2))  # 64 anchors + 100
  assert B.budget_space("mqt", 16, bank_size=100) == tuple(range(2, 101, 2))


# ------------------------------------------------------------- query_prior='local'

@pytest.mark.parametrize("grid", [8, 16, 32])
def test_query_homes_cover_the_page_coarse_to_fine(grid):
  from parcel_jax.models.connectors.blocks import query_homes
  homes = query_homes(grid * grid, grid)
  assert sorted(homes.tolist()) == list(range(grid * grid))
  side = grid
  while side > 1:   # each prefix of (grid/side)^2 homes: one per side x side block
    n = (grid // side) ** 2
    rows, cols = np.divmod(homes[:n], grid)
    assert len(set(zip((rows // side).tolist(), (cols // side).tolist()))) == n
    side //= 2
  k = int(np.random.default_rng().integers(1, grid * grid))
  np.testing.assert_array_equal(query_homes(grid * grid + k, grid)[-k:], homes[:k])   # wraps


@pytest.mark.parametrize("method", ["parcel", "mqt"])
def test_local_prior_starts_each_query_at_its_home(method):
  from parcel_jax.models.connectors.blocks import query_homes
  sigma = float(np.random.default_rng().uniform(0.3, 0.6))
  conn, cfg = make(method, query_prior="local", query_prior_sigma=sigma)
  plain, _ = make(method)
  spec = spec_for(method)
  bucket = spec.bucket(spec.budgets[-1])
  x = features()
  budgets = jnp.full((2,), spec.budgets[-1])
  homes = query_homes(bucket.query_slots, GRID)
  weights = np.asarray(conn.query_attention(x, bucket, budgets) if method == "parcel"
                       else conn.resampler.cross_attention_weights(
                           einops.rearrange(x, "b h w d -> b (h w) d"), bucket.query_slots, budgets))
  at_home = (weights.argmax(-1) == homes[None]).mean()
  assert at_home > 0.95, at_home
  assert weights.max(-1).mean() > 0.3        # a fetch, not a blur
  plain_weights = np.asarray(plain.query_attention(x, bucket, budgets) if method == "parcel"
                             else plain.resampler.cross_attention_weights(
                                 einops.rearrange(x, "b h w d -> b (h w) d"), bucket.query_slots, budgets))
  assert (plain_weights.argmax(-1) == homes[None]).mean() < 0.1
  np.testing.assert_allclose(np.exp(np.asarray(conn.resampler.log_prior_sigma[...])), sigma, rtol=1e-6)


def test_local_prior_width_is_learned():
  conn, _ = make("parcel", query_prior="local")
  graphdef, params = nnx.split(conn)
  x = features()

  def loss(p):
    out, _ = nnx.merge(graphdef, p)(x, B.Bucket(8, 64), jnp.full((2,), 120))
    return jnp.sum(jnp.sin(out))

  grads = jax.grad(loss)(params)
  assert np.all(np.abs(np.asarray(grads["resampler"]["log_prior_sigma"][...])) > 0)


def test_query_prior_errors_name_the_field():
  with pytest.raises(ValueError, match="model.connector.query_prior"):
    C.ConnectorConfig(method="parcel", width=WIDTH, grid_size=GRID, num_heads=4, query_prior="gaussian")
  with pytest.raises(ValueError, match=r"model.connector.query_prior_sigma=0.0 must be > 0"):
    C.ConnectorConfig(method="mqt", width=WIDTH, grid_size=GRID, num_heads=4, query_prior="local",
                      query_prior_sigma=0.0)


# ------------------------------------------------------------- fetch_init

def _layer_norm(x):
  x = np.asarray(x, np.float64)
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)


@pytest.mark.parametrize("method,kw", [
    ("parcel", {}), ("parcel", {"conditioning": "none"}), ("parcel", {"conditioning": "dual_cross"}),
    ("mqt", {})])
def test_fetch_init_starts_each_query_as_a_copy_of_its_home_patch(method, kw):
  """With a sharp locality prior, a fetch-initialised query's first token is
  LN(bank + home position code + LN(feature at home)); without fetch_init it is not."""
  from parcel_jax.models import layers
  from parcel_jax.models.connectors.blocks import query_homes
  conn, _ = make(method, query_prior="local", query_prior_sigma=0.05, fetch_init=True, **kw)
  plain, _ = make(method, query_prior="local", query_prior_sigma=0.05, **kw)
  spec = spec_for(method)
  budget = int(np.random.default_rng().choice([b for b in spec.budgets if spec.bucket(b).query_slots]))
  bucket = spec.bucket(budget)
  x = features()
  budgets = jnp.full((2,), budget)
  n_q = budget - bucket.num_anchors
  homes = query_homes(bucket.query_slots, GRID)
  flat = einops.rearrange(np.asarray(x), "b h w d -> b (h w) d")
  residual = (np.asarray(conn.resampler.bank[...])[:bucket.query_slots]
              + np.asarray(layers.sincos_2d(GRID, WIDTH))[homes])
  expected = _layer_norm(residual[None] + _layer_norm(flat)[:, homes])[:, :n_q]
  for module, close in ((conn, True), (plain, False)):
    tokens, mask = run(module, x, bucket, budgets)
    got = np.asarray(tokens)[:, bucket.num_anchors:bucket.num_anchors + n_q]
    assert np.asarray(mask)[:, bucket.num_anchors:].sum() == 2 * n_q
    if close:
      np.testing.assert_allclose(got, expected, atol=2e-4)
    else:
      assert np.abs(got - expected).max() > 0.5


def test_fetch_init_keeps_every_parameter_trainable():
  """Zero-initialised output maps still get gradient, so the query path can leave the copy."""
  conn, _ = make("parcel", query_prior="local", fetch_init=True)
  graphdef, params = nnx.split(conn)
  x = features()

  def loss(p):
    out, _ = nnx.merge(graphdef, p)(x, B.Bucket(8, 64), jnp.full((2,), 120))
    return jnp.sum(jnp.sin(3.0 * out))

  grads = jax.grad(loss)(params)["resampler"]
  for path in (("mlp", "wo"), ("condition", "attn", "o_kernel"), ("cross", "attn", "v_kernel")):
    g = grads
    for key in path:
      g = g[key]
    assert np.abs(np.asarray(g[...])).max() > 0, path
