"""SigLIP-style ViT: shapes, the So400m parameter count, conv equivalence, scan/remat."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from parcel_jax.models import layers, vit


def assert_rel_close(actual, desired, tol=1e-5):
  """max |actual - desired| <= tol * max |desired| over the whole tree (max-norm relative
  error; per-leaf scaling would divide by gradients that are zero in exact arithmetic,
  e.g. of key biases, which softmax is invariant to)."""
  chex.assert_trees_all_equal_shapes(actual, desired)
  err = max(float(jnp.max(jnp.abs(a - d))) for a, d in zip(jax.tree.leaves(actual), jax.tree.leaves(desired)))
  scale = max(float(jnp.max(jnp.abs(d))) for d in jax.tree.leaves(desired))
  assert err <= tol * scale, f"max abs err {err:.3g} > {tol} x max |ref| {scale:.3g}"


def tiny(**overrides) -> vit.ViTConfig:
  """The ``tiny`` preset with two blocks of four heads (so depth and heads both matter)."""
  return vit.vit_config("tiny", **{"depth": 2, "num_heads": 4, **overrides})


def _params(model):
  return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@nnx.jit
def _apply(model, images):
  return model(images)


def siglip_param_count(cfg: vit.ViTConfig) -> int:
  """Closed form: patch conv + position table + blocks + final LayerNorm (no MAP head)."""
  d, p, n = cfg.width, cfg.patch_size, cfg.grid_size ** 2
  block = (2 * 2 * d              # two LayerNorms (scale, bias)
           + 4 * (d * d + d)      # q, k, v, out projections with biases
           + 2 * d * cfg.mlp_dim + cfg.mlp_dim + d)  # MLP with biases
  return (p * p * 3 * d + d) + n * d + cfg.depth * block + 2 * d


@pytest.mark.parametrize("scan", [False, True])
def test_so400m_param_count(scan):
  cfg = vit.vit_config("so400m_14", scan=scan)
  model = nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0)))
  count = layers.num_params(nnx.state(model, nnx.Param))
  print(f"SigLIP So400m/14 @224 vision tower: {count:,} parameters")
  assert cfg.grid_size == 16
  assert count == siglip_param_count(cfg) == 412_442_352


@pytest.mark.parametrize("posemb", ["learn", "sincos2d"])
def test_shapes_and_finite(posemb):
  cfg = tiny(posemb=posemb)
  model = vit.ViT(cfg, rngs=nnx.Rngs(0))
  images = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3), minval=-1, maxval=1)
  out = _apply(model, images)
  chex.assert_shape(out, (2, 16, 16, cfg.width))
  chex.assert_tree_all_finite(out)
  # Final LayerNorm (scale 1, bias 0 at init): per-token zero mean, unit variance.
  np.testing.assert_allclose(out.mean(-1), 0.0, atol=1e-5)
  np.testing.assert_allclose(out.var(-1), 1.0, atol=1e-3)
  has_table = "posemb" in _params(model)
  assert has_table == (posemb == "learn")


def test_center_input_ignores_a_per_image_colour_cast():
  rng = np.random.default_rng()
  images = jnp.asarray(rng.uniform(-0.5, 0.5, (3, 64, 64, 3)), jnp.float32)
  cast = jnp.asarray(rng.uniform(-0.4, 0.4, (3, 1, 1, 3)), jnp.float32)  # one colour per image
  centred = vit.ViT(tiny(center_input=True), rngs=nnx.Rngs(0))
  assert_rel_close(_apply(centred, images + cast), _apply(centred, images), tol=1e-5)
  # Off (pretrained SigLIP's raw pixels): the cast changes the features.
  raw = vit.ViT(tiny(center_input=False), rngs=nnx.Rngs(0))
  diff = jnp.max(jnp.abs(_apply(raw, images + cast) - _apply(raw, images)))
  assert diff > 1e-2


def test_bad_image_shape_names_expected_shape():
  model = vit.ViT(tiny(), rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"\(batch, 64, 64, 3\)"):
    model(jnp.zeros((1, 32, 32, 3)))


@pytest.mark.parametrize("overrides, field", [
    (dict(image_size=65), "image_size"),
    (dict(num_heads=3), "width"),
    (dict(posemb="rope"), "posemb"),
    (dict(remat="sometimes"), "remat"),
    (dict(depth=0), "depth"),
    (dict(attn_window=3), "attn_window"),
    (dict(attn_window=-2), "attn_window"),
    (dict(attn_window=2, global_blocks=3), "global_blocks"),
    (dict(attn_window=2, depth=2, global_blocks=1, scan=True), "global_blocks"),
])
def test_config_validation(overrides, field):
  with pytest.raises(ValueError, match=field):
    tiny(**overrides)


def _window_masked_features(model: vit.ViT, images, window: int, num_local: int):
  """Reference for ``attn_window``: global-layout blocks, the first ``num_local`` with a
  block-diagonal attention mask."""
  g = model.cfg.grid_size
  rows, cols = np.divmod(np.arange(g * g), g)
  window_id = (rows // window) * (g // window) + cols // window
  local = jnp.asarray(window_id[:, None] == window_id[None, :])[None]
  x = model.embed_patches(images)
  for i, block in enumerate(model.blocks):
    x = x + block.attn(block.norm1(x), mask=local if i < num_local else None)
    x = x + block.mlp(block.norm2(x))
  return model.norm(x).reshape(images.shape[0], g, g, -1)


@pytest.mark.parametrize("window", [2, 4])
def test_attn_window_is_block_diagonal_attention(window):
  cfg = tiny(posemb="sincos2d", depth=2, attn_window=window)
  model = vit.ViT(cfg, rngs=nnx.Rngs(5))
  images = jax.random.uniform(jax.random.key(6), (2, 64, 64, 3), minval=-1, maxval=1)
  out = _apply(model, images)
  assert_rel_close(out, _window_masked_features(model, images, window, num_local=2), tol=1e-5)
  # Local: changing the pixels of one window changes the features of that window only.
  rng = np.random.default_rng()
  wr, wc = rng.integers(16 // window, size=2)
  px = window * cfg.patch_size
  changed = images.at[:, wr * px:(wr + 1) * px, wc * px:(wc + 1) * px].add(0.5)
  moved = np.asarray(jnp.max(jnp.abs(_apply(model, changed) - out), axis=(0, 3))) > 1e-6
  expected = np.zeros((16, 16), bool)
  expected[wr * window:(wr + 1) * window, wc * window:(wc + 1) * window] = True
  np.testing.assert_array_equal(moved, expected)
  # A window the size of the grid is global attention.
  full = vit.ViT(dataclasses.replace(cfg, attn_window=16), rngs=nnx.Rngs(5))
  glob = vit.ViT(dataclasses.replace(cfg, attn_window=0), rngs=nnx.Rngs(5))
  np.testing.assert_array_equal(_apply(full, images), _apply(glob, images))


@pytest.mark.parametrize("depth, global_blocks", [(2, 1), (3, 2), (3, 3)])
def test_global_blocks_follow_the_local_ones(depth, global_blocks):
  cfg = tiny(posemb="sincos2d", depth=depth, attn_window=2, global_blocks=global_blocks)
  model = vit.ViT(cfg, rngs=nnx.Rngs(7))
  images = jax.random.uniform(jax.random.key(8), (2, 64, 64, 3), minval=-1, maxval=1)
  expected = _window_masked_features(model, images, 2, num_local=depth - global_blocks)
  assert_rel_close(_apply(model, images), expected, tol=1e-5)


def test_patch_embedding_is_strided_conv():
  cfg = tiny(posemb="sincos2d")
  model = vit.ViT(cfg, rngs=nnx.Rngs(3))
  images = jax.random.normal(jax.random.key(4), (2, 64, 64, 3))
  got = model.embed_patches(images) - layers.sincos_2d(cfg.grid_size, cfg.width)
  conv = jax.lax.conv_general_dilated(
      images, model.patch_kernel[...], (cfg.patch_size,) * 2, "VALID",
      dimension_numbers=("NHWC", "HWIO", "NHWC")) + model.patch_bias[...]
  np.testing.assert_allclose(got, conv.reshape(2, -1, cfg.width), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn_window", [0, 2])
def test_scan_and_remat_match_unrolled(attn_window):
  base_cfg = tiny(depth=3, image_size=32, attn_window=attn_window)
  base = vit.ViT(base_cfg, rngs=nnx.Rngs(0))
  ref_params = _params(base)
  images = jax.random.normal(jax.random.key(5), (2, 32, 32, 3))
  probe = jax.random.normal(jax.random.key(6), (2, 8, 8, base_cfg.width))

  def out_and_grads(cfg, params):
    # Structure only (no eager initialisation); all variables are Params.
    graphdef, state = nnx.split(nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(1))))
    nnx.replace_by_pure_dict(state, params)

    @jax.jit
    def f(state):
      return jnp.sum(nnx.merge(graphdef, state)(images) * probe)
    loss, grads = jax.value_and_grad(f)(state)
    return loss, nnx.to_pure_dict(grads)

  ref_loss, ref_grads = out_and_grads(base_cfg, ref_params)
  for scan, remat in [(True, "full")]:  # remat never changes values; scan + remat covers both
    cfg = dataclasses.replace(base_cfg, scan=scan, remat=remat)
    params = vit.to_scanned(ref_params, cfg) if scan else ref_params
    loss, grads = out_and_grads(cfg, params)
    if scan:
      grads = vit.from_scanned(grads, cfg)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    assert_rel_close(grads, ref_grads)


def test_bfloat16_compute_close_to_float32():
  images = jax.random.uniform(jax.random.key(7), (1, 64, 64, 3), minval=-1, maxval=1)
  ref = _apply(vit.ViT(tiny(), rngs=nnx.Rngs(0)), images)
  model = vit.ViT(tiny(dtype=jnp.bfloat16), rngs=nnx.Rngs(0))
  out = _apply(model, images)
  assert out.dtype == jnp.bfloat16
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  np.testing.assert_allclose(out.astype(jnp.float32), ref, atol=0.1)
