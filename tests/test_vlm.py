"""The assembled VLM: masked (bucketed) == compact forward, and the paper-size model."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from parcel_jax import budgets as B
from parcel_jax.models import connectors, gemma, vit, vlm
from tests.util import assert_rel_close

GRID = 16


def tiny_model_config(method, frame_posemb="none", visual_positions="packed", **connector_kw):
  vision = vit.ViTConfig(image_size=32, patch_size=2, width=32, depth=1, mlp_dim=64, num_heads=2)
  connector = connectors.ConnectorConfig(method=method, width=32, grid_size=GRID, num_heads=2,
                                         mlp_dim=64, **connector_kw)
  decoder = gemma.DecoderConfig(vocab_size=50, width=32, depth=2, mlp_dim=64, num_heads=2,
                                num_kv_heads=1, head_dim=16, post_norms=True, attn_softcap=50.0,
                                final_softcap=30.0, sliding_window=40, local_global=True)
  return vlm.ModelConfig(vision, connector, decoder, frame_posemb, visual_positions)


@functools.partial(jax.jit, static_argnums=(0, 6))
def _logits(graphdef, params, features, text, text_mask, budgets, bucket):
  ar = jnp.arange(text.shape[1])[None] >= 5  # 5 prefix tokens, then a causal suffix
  return nnx.merge(graphdef, params).text_logits(
      features, text, text_mask, jnp.broadcast_to(ar, text.shape), bucket=bucket, budgets=budgets)


def random_inputs(rng, batch=2, length=9):
  images = jnp.asarray(rng.uniform(-1, 1, size=(batch, 32, 32, 3)), jnp.float32)
  text = jnp.asarray(rng.integers(5, 50, size=(batch, length)), jnp.int32)
  text_mask = jnp.asarray(np.arange(length)[None] < rng.integers(7, length + 1, size=(batch, 1)))
  return images, text, text_mask


@pytest.mark.parametrize("method,positions", [
    ("parcel", "packed"), ("m3", "packed"), ("mqt", "packed"), ("none", "packed"),
    ("parcel", "reserved"), ("mqt", "reserved")])
def test_bucketed_forward_equals_compact(method, positions):
  rng = np.random.default_rng()
  cfg = tiny_model_config(method, visual_positions=positions)
  model = vlm.VLM(cfg, rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  graphdef, params = nnx.split(model)
  spec = B.BudgetSpec.from_config(ml_collections.ConfigDict(dict(
      method=method, routing="piecewise", bank_size=0, budgets=(), query_bucket=64)), GRID)
  images, text, text_mask = random_inputs(rng)
  features = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode_images(x))(params, images)
  edges = [b for b in (16, 62, 64, 256) if b in spec.budgets]
  others = [int(b) for b in rng.choice(spec.budgets, size=min(3, len(spec.budgets)), replace=False)]
  for budget in sorted(set(edges + others)):
    vec = jnp.full((2,), budget, jnp.int32)
    bucketed = _logits(graphdef, params, features, text, text_mask, vec, spec.bucket(budget))
    compact = _logits(graphdef, params, features, text, text_mask, vec, spec.compact_bucket(budget))
    valid = np.asarray(text_mask)
    assert_rel_close(np.asarray(bucketed)[valid], np.asarray(compact)[valid], 1e-5)


def test_compact_shape_and_budget_changes_logits():
  rng = np.random.default_rng()
  cfg = tiny_model_config("parcel")
  model = vlm.VLM(cfg, rngs=nnx.Rngs(0))
  images, text, text_mask = random_inputs(rng)
  ar = jnp.zeros_like(text_mask)
  a = model(images, text, text_mask, ar, bucket=B.Bucket(4, 0), budgets=jnp.array([16, 16]))
  b = model(images, text, text_mask, ar, bucket=B.Bucket(8, 36), budgets=jnp.array([100, 100]))
  assert a.shape == b.shape == (2, text.shape[1], 50)
  assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4


def test_paper_size_parameter_counts():
  """So400m/14 + gemma2_2b + PARCEL connector, built abstractly (no allocation)."""
  vision = vit.vit_config("So400m/14")
  decoder = gemma.decoder_config("gemma2_2b")
  connector = connectors.ConnectorConfig(method="parcel", width=1152, grid_size=16,
                                         num_heads=12, mlp_dim=4304)
  cfg = vlm.ModelConfig(vision, connector, decoder)
  model = nnx.eval_shape(lambda: vlm.VLM(cfg, rngs=nnx.Rngs(0)))
  counts = vlm.parameter_counts(model)
  print("\nPaliGemma-2 3B + PARCEL parameter counts:", {k: f"{v:,}" for k, v in counts.items()})
  # Closed forms from the architecture.
  d, m, L, p = 1152, 4304, 27, 14
  vit_count = (p * p * 3 * d + d) + 256 * d + L * (4 * (d * d + d) + 2 * d * m + m + d + 4 * d) + 2 * d
  D, M, H, K, hd, V, Ld = 2304, 9216, 8, 4, 256, 257152, 26
  dec_count = V * D + Ld * (D * H * hd * 2 + D * K * hd * 2 + 3 * D * M + 4 * D) + D
  attn = 4 * (d * d + d) + 4 * d          # projections + 2 LayerNorms (query, context)
  conn_count = 192 * d + 2 * attn + (2 * d * m + m + d) + 2 * d + 2 * d
  assert counts["vision"] == vit_count == 412_442_352
  assert counts["decoder"] == dec_count == 2_616_996_096
  assert counts["projection"] == d * D + D
  assert counts["connector"] == conn_count
  assert counts["total"] == vit_count + dec_count + d * D + D + conn_count


# ------------------------------------------------------------------ several frames per example

@functools.partial(jax.jit, static_argnums=(0, 7))
def _frame_logits(graphdef, params, frames, text, text_mask, budgets, frame_mask, bucket):
  ar = jnp.arange(text.shape[1])[None] >= 5
  model = nnx.merge(graphdef, params)
  return model(frames, text, text_mask, jnp.broadcast_to(ar, text.shape), bucket=bucket,
               budgets=budgets, frame_mask=frame_mask)


@pytest.mark.parametrize("method,frame_posemb", [("parcel", "none"), ("m3", "none"), ("parcel", "sincos")])
def test_padded_frames_equal_the_real_frames_alone(method, frame_posemb):
  """A batch with missing frames (frame_mask False) at a padded bucket gives, on every valid
  text position, the logits of each example run alone with only its real frames, compact
  (with frame codes: a real frame's code is its rank among the real frames)."""
  rng = np.random.default_rng()
  model = vlm.VLM(tiny_model_config(method, frame_posemb),
                  rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  graphdef, params = nnx.split(model)
  spec = B.BudgetSpec.from_config(ml_collections.ConfigDict(dict(
      method=method, routing="piecewise", bank_size=0, budgets=(), query_bucket=64)), GRID)
  t = 4
  frames = jnp.asarray(rng.uniform(-1, 1, size=(2, t, 32, 32, 3)), jnp.float32)
  _, text, text_mask = random_inputs(rng)
  frame_mask = np.ones((2, t), bool)
  for row in range(2):   # a random non-empty subset of real frames, anywhere in the sequence
    frame_mask[row, rng.permutation(t)[:rng.integers(0, t)]] = False
  budget = int(rng.choice([b for b in spec.budgets if spec.bucket(b) != spec.compact_bucket(b)]
                          or spec.budgets))
  vec = jnp.full((2,), budget, jnp.int32)
  padded = _frame_logits(graphdef, params, frames, text, text_mask, vec, jnp.asarray(frame_mask),
                         spec.bucket(budget))
  for row in range(2):
    real = frames[row:row + 1, np.flatnonzero(frame_mask[row])]
    alone = _frame_logits(graphdef, params, real, text[row:row + 1], text_mask[row:row + 1],
                          vec[:1], None, spec.compact_bucket(budget))
    valid = np.asarray(text_mask[row])
    assert_rel_close(np.asarray(padded[row])[valid], np.asarray(alone[0])[valid], 1e-5)


def test_frame_tokens_are_each_frames_tokens_in_order():
  """T frames give T*slots tokens: frame i's tokens (and mask) are those of frame i encoded
  as a single image, at its example's budget; a missing frame's slots are all masked."""
  rng = np.random.default_rng()
  model = vlm.VLM(tiny_model_config("parcel"), rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  t, bucket = 3, B.Bucket(8, 64)
  frames = jnp.asarray(rng.uniform(-1, 1, size=(2, t, 32, 32, 3)), jnp.float32)
  budgets = jnp.asarray(rng.choice([66, 80, 128], size=2), jnp.int32)
  frame_mask = jnp.asarray([[True, False, True], [True, True, True]])
  tokens, mask = model.visual_tokens(model.encode_images(frames), bucket, budgets, frame_mask)
  assert tokens.shape == (2, t * bucket.num_slots, 32) and mask.shape == (2, t * bucket.num_slots)
  slots = bucket.num_slots
  for i in range(t):
    single, single_mask = model.visual_tokens(model.encode_images(frames[:, i]), bucket, budgets)
    assert_rel_close(tokens[:, i * slots:(i + 1) * slots], single, 1e-5)
    want = np.asarray(single_mask) & np.asarray(frame_mask)[:, i:i + 1]
    np.testing.assert_array_equal(np.asarray(mask[:, i * slots:(i + 1) * slots]), want)
  np.testing.assert_array_equal(np.asarray(mask).sum(1), np.asarray(budgets) * [2, 3])


@pytest.mark.parametrize("frame_posemb", ["none", "sincos"])
def test_one_frame_is_the_single_image_and_frame_order_matters(frame_posemb):
  rng = np.random.default_rng()
  model = vlm.VLM(tiny_model_config("parcel", frame_posemb),
                  rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  graphdef, params = nnx.split(model)
  images, text, text_mask = random_inputs(rng)
  vec, bucket = jnp.full((2,), 100, jnp.int32), B.Bucket(8, 36)
  single = _frame_logits(graphdef, params, images, text, text_mask, vec, None, bucket)
  one = _frame_logits(graphdef, params, images[:, None], text, text_mask, vec, None, bucket)
  valid = np.asarray(text_mask)
  assert_rel_close(np.asarray(one)[valid], np.asarray(single)[valid], 1e-6)
  frames = jnp.stack([images, images[::-1]], axis=1)          # (2, 2, S, S, 3)
  forward = _frame_logits(graphdef, params, frames, text, text_mask, vec, None, bucket)
  reverse = _frame_logits(graphdef, params, frames[:, ::-1], text, text_mask, vec, None, bucket)
  assert np.abs(np.asarray(forward) - np.asarray(reverse))[valid].max() > 1e-4


def test_frame_codes_name_each_real_frame_by_its_rank():
  """frame_posemb='sincos': frame i's tokens are its single-image tokens plus code(rank) -
  code(0), rank = its place among the example's real frames; the same image repeated gives
  the same tokens in every frame without codes and different ones with them."""
  rng = np.random.default_rng()
  seed = int(rng.integers(1 << 30))
  plain = vlm.VLM(tiny_model_config("parcel"), rngs=nnx.Rngs(seed))
  coded = vlm.VLM(tiny_model_config("parcel", "sincos"), rngs=nnx.Rngs(seed))
  t, bucket = 4, B.Bucket(8, 64)
  image = jnp.asarray(rng.uniform(-1, 1, size=(2, 1, 32, 32, 3)), jnp.float32)
  frames = jnp.repeat(image, t, axis=1)                    # one image, four times
  budgets = jnp.asarray(rng.choice([66, 80, 128], size=2), jnp.int32)
  frame_mask = jnp.asarray([[True, False, True, True], [True, True, True, True]])
  slots, width = bucket.num_slots, 32
  features = plain.encode_images(frames)
  base_tokens, _ = plain.visual_tokens(features, bucket, budgets, frame_mask)
  tokens, _ = coded.visual_tokens(features, bucket, budgets, frame_mask)
  base_tokens = np.asarray(base_tokens).reshape(2, t, slots, width)
  tokens = np.asarray(tokens).reshape(2, t, slots, width)
  for i in range(1, t):   # without codes every frame of a repeated image is the same
    np.testing.assert_allclose(base_tokens[:, i], base_tokens[:, 0], atol=1e-6)
  ranks = np.asarray([[0, 0, 1, 2], [0, 1, 2, 3]])
  angle = np.arange(t)[:, None] / 10_000.0 ** (np.arange(width // 2) / (width // 2 - 1))
  table = np.concatenate([np.sin(angle), np.cos(angle)], axis=1)
  table = table - table[0]
  for row in range(2):
    for i in range(t):
      np.testing.assert_allclose(tokens[row, i] - base_tokens[row, i],
                                 np.broadcast_to(table[ranks[row, i]], (slots, width)), atol=1e-5)
  np.testing.assert_allclose(tokens[:, 0], base_tokens[:, 0], atol=0)   # the first frame: unchanged
  assert np.abs(tokens[1, 1] - tokens[1, 0]).max() > 0.1
  with pytest.raises(ValueError, match="model.frame_posemb='learned' is unknown"):
    tiny_model_config("parcel", "learned")


def test_a_saved_config_without_frame_posemb_is_the_same_model():
  """A checkpoint written before model.frame_posemb / visual_positions existed resumes as
  frame_posemb='none', visual_positions='packed'."""
  from configs import base
  from parcel_jax import state
  current = base.get_config().model.to_dict()
  saved = {k: v for k, v in current.items() if k not in ("frame_posemb", "visual_positions")}
  assert state.model_field_diffs(saved, current) == []
  current["frame_posemb"] = "sincos"
  assert state.model_field_diffs(saved, current) == [
      "model.frame_posemb: checkpoint 'none', config 'sincos'"]


# ------------------------------------------------------------- visual_positions='reserved'

def test_reserved_positions_put_each_slot_and_the_text_where_the_budget_does_not_move_them():
  rng = np.random.default_rng()
  frames, slots, reserved = int(rng.integers(1, 4)), int(rng.integers(1, 20)), 20
  length = int(rng.integers(3, 9))
  mask = jnp.asarray(rng.random((3, frames * slots + length)) < 0.7)
  pos = np.asarray(vlm.reserved_positions(mask, frames * slots, frames, reserved))
  for f in range(frames):
    np.testing.assert_array_equal(pos[:, f * slots:(f + 1) * slots],
                                  np.broadcast_to(f * reserved + np.arange(slots), (3, slots)))
  text_mask = np.asarray(mask)[:, frames * slots:]
  np.testing.assert_array_equal(pos[:, frames * slots:],
                                frames * reserved + np.cumsum(text_mask, axis=1) - 1)
  with pytest.raises(ValueError, match="21 visual slots per frame exceed the 20 positions"):
    vlm.reserved_positions(jnp.ones((1, 25), bool), 21, 1, 20)


def test_reserved_positions_equal_packed_at_the_largest_budget_only():
  """At the full budget every slot is valid, so both numberings agree; below it the text of
  'packed' moves with the budget and that of 'reserved' does not."""
  rng = np.random.default_rng()
  seed = int(rng.integers(1 << 30))
  spec = B.BudgetSpec.from_config(ml_collections.ConfigDict(dict(
      method="parcel", routing="piecewise", bank_size=0, budgets=(), query_bucket=64)), GRID)
  images, text, text_mask = random_inputs(rng)
  outs = {}
  for positions in ("packed", "reserved"):
    model = vlm.VLM(tiny_model_config("parcel", visual_positions=positions), rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    features = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode_images(x))(params, images)
    for budget in (spec.budgets[-1], int(rng.choice(spec.budgets[:-1]))):
      vec = jnp.full((2,), budget, jnp.int32)
      outs[positions, budget == spec.budgets[-1]] = np.asarray(
          _logits(graphdef, params, features, text, text_mask, vec, spec.bucket(budget)))
  valid = np.asarray(text_mask)
  assert_rel_close(outs["packed", True][valid], outs["reserved", True][valid], 1e-5)
  assert np.abs(outs["packed", False][valid] - outs["reserved", False][valid]).max() > 1e-3
  with pytest.raises(ValueError, match="model.visual_positions='fixed' is unknown"):
    tiny_model_config("parcel", visual_positions="fixed")


def test_reserved_positions_prefill_and_decode_match_the_teacher_forced_pass():
  from parcel_jax import generation
  rng = np.random.default_rng()
  model = vlm.VLM(tiny_model_config("parcel", visual_positions="reserved"),
                  rngs=nnx.Rngs(int(rng.integers(1 << 30))))
  spec = B.BudgetSpec.from_config(ml_collections.ConfigDict(dict(
      method="parcel", routing="piecewise", bank_size=0, budgets=(), query_bucket=64)), GRID)
  budget = int(rng.choice(spec.budgets[:-1]))
  bucket, vec = spec.bucket(budget), jnp.full((2,), budget, jnp.int32)
  images, text, _ = random_inputs(rng, length=7)
  features = model.encode_images(images)
  prefix, nxt = text[:, :6], text[:, 6:]
  first, cache = generation.prefill(model, features, prefix, jnp.ones(prefix.shape, bool), vec,
                                    bucket=bucket, cache_size=bucket.num_slots + 8)
  hidden, _ = model.decoder.decode_step(model.decoder.embed(nxt), cache)
  ar = jnp.broadcast_to(jnp.arange(7)[None] >= 6, text.shape)
  forced = model.text_logits(features, text, jnp.ones(text.shape, bool), ar, bucket=bucket, budgets=vec)
  assert_rel_close(np.asarray(first), np.asarray(forced[:, 5]), 1e-5)
  assert_rel_close(np.asarray(model.decoder.logits(hidden[:, 0])), np.asarray(forced[:, 6]), 1e-5)


# ------------------------------------------------------------- visual_positions='spatial'

def test_spatial_positions_make_a_permuted_full_grid_the_uncompressed_model():
  """random_subset at the full budget holds every patch in a shuffled order; placed at their
  cells, the decoder sees what `none` (packed, raster order) sees: the same logits."""
  rng = np.random.default_rng()
  seed = int(rng.integers(1 << 30))
  images, text, text_mask = random_inputs(rng)
  outs = {}
  for method, positions in (("none", "packed"), ("random_subset", "spatial"), ("random_subset", "packed")):
    model = vlm.VLM(tiny_model_config(method, visual_positions=positions,
                                      **({"subset_seed": seed} if method == "random_subset" else {})),
                    rngs=nnx.Rngs(seed))
    graphdef, params = nnx.split(model)
    features = jax.jit(lambda p, x: nnx.merge(graphdef, p).encode_images(x))(params, images)
    bucket = B.Bucket(GRID, 0) if method == "none" else B.Bucket(0, GRID * GRID)
    outs[method, positions] = np.asarray(_logits(graphdef, params, features, text, text_mask,
                                                 jnp.full((2,), GRID * GRID, jnp.int32), bucket))
  valid = np.asarray(text_mask)
  assert_rel_close(outs["random_subset", "spatial"][valid], outs["none", "packed"][valid], 1e-4)
  assert np.abs(outs["random_subset", "packed"][valid] - outs["none", "packed"][valid]).max() > 1e-3


@pytest.mark.parametrize("method,kw", [("parcel", {"query_prior": "local"}), ("m3", {}), ("none", {}),
                                       ("downsample", {}), ("random_subset", {}),
                                       ("mqt", {"query_prior": "local"})])
def test_slot_cells_lie_on_the_grid_and_pooled_tokens_sit_inside_their_block(method, kw):
  spec = B.BudgetSpec.from_config(ml_collections.ConfigDict(dict(
      method=method, routing="piecewise", bank_size=0, budgets=(), query_bucket=64)), GRID)
  conn = connectors.make_connector(connectors.ConnectorConfig(
      method=method, width=32, grid_size=GRID, num_heads=2, mlp_dim=64, **kw), rngs=nnx.Rngs(0))
  for budget in spec.budgets[::max(1, len(spec.budgets) // 6)] + (spec.budgets[-1],):
    bucket = spec.bucket(budget)
    cells = conn.slot_cells(bucket)
    assert cells.shape == (bucket.num_slots,) and cells.min() >= 0 and cells.max() < GRID * GRID
    if method in ("parcel", "m3", "downsample", "none") and bucket.num_anchors:
      side = bucket.anchor_grid if method != "downsample" else conn.vision_grid(conn.cfg, bucket)
      k = GRID // side
      rows, cols = np.divmod(cells[:side * side], GRID)
      np.testing.assert_array_equal(rows // k * side + cols // k, np.arange(side * side))
  full = conn.slot_cells(spec.bucket(spec.budgets[-1]))
  assert sorted(full.tolist()) == list(range(GRID * GRID))   # the full budget covers the page once


def test_spatial_positions_refuse_queries_without_a_home():
  rng = np.random.default_rng()
  model = vlm.VLM(tiny_model_config("parcel", visual_positions="spatial"), rngs=nnx.Rngs(0))
  images, text, text_mask = random_inputs(rng)
  with pytest.raises(ValueError, match="visual_positions='spatial' needs slots with a place.*query_prior='local'"):
    model(images, text, text_mask, jnp.zeros_like(text_mask), bucket=B.Bucket(8, 64),
          budgets=jnp.array([100, 100]))
