"""Gemma / Gemma-2 prefix-LM decoder: masks, masked-slot invariance, KV cache, scan/remat."""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from parcel_jax.models import gemma, layers

# Wider than the embedded default's ``tiny`` (grouped-query attention with 2 KV heads) and with a
# window shorter than the test sequences, so the Gemma-2 switches all matter.
GEMMA2_TINY = gemma.decoder_config("tiny", vocab_size=128, width=128, mlp_dim=512, num_heads=4,
                                   num_kv_heads=2, sliding_window=64)
GEMMA1_TINY = dataclasses.replace(GEMMA2_TINY, post_norms=False, attn_softcap=None, final_softcap=None,
                                  local_global=False, sliding_window=None, num_kv_heads=1)
# Gemma-1 2B as in PaliGemma-1 (multi-query attention, none of the Gemma-2 switches).
GEMMA1_2B = gemma.DecoderConfig(vocab_size=257_216, width=2048, depth=18, mlp_dim=16_384, num_heads=8,
                                num_kv_heads=1, head_dim=256, post_norms=False, attn_softcap=None,
                                final_softcap=None, sliding_window=None, local_global=False)


def fresh_rng():
  seed = int(np.random.SeedSequence().entropy % 2**31)
  print(f"seed={seed}")
  return np.random.default_rng(seed), seed


def rel_err(actual, desired) -> float:
  """Max-norm relative error over a whole tree."""
  err = max(float(jnp.max(jnp.abs(a - d))) for a, d in zip(jax.tree.leaves(actual), jax.tree.leaves(desired)))
  return err / max(float(jnp.max(jnp.abs(d))) for d in jax.tree.leaves(desired))


@nnx.jit
def forward(model, x, input_mask, ar_mask):
  """-> hidden (b, S, width), logits (b, S, vocab)."""
  hidden = model(x, input_mask=input_mask, ar_mask=ar_mask)
  return hidden, model.logits(hidden)


# ------------------------------------------------------------------ configs

def gemma_param_count(cfg: gemma.DecoderConfig) -> int:
  """Closed form: tied embedding + layers + final norm."""
  d, hd = cfg.width, cfg.head_dim
  attn = d * cfg.num_heads * hd * 2 + d * cfg.num_kv_heads * hd * 2   # q, out; k, v
  mlp = 3 * d * cfg.mlp_dim                                           # gate, up, down
  norms = (4 if cfg.post_norms else 2) * d
  return cfg.vocab_size * d + cfg.depth * (attn + mlp + norms) + d


@pytest.mark.parametrize("variant, scan, expected", [
    ("gemma2_2b", False, 2_616_996_096),
    ("gemma2_2b", True, 2_616_996_096),
    ("gemma_2b", False, 2_508_662_784),
])
def test_param_count_without_allocating(variant, scan, expected):
  cfg = (gemma.decoder_config(variant, scan=scan) if variant in gemma.PRESETS
         else dataclasses.replace(GEMMA1_2B, scan=scan))
  model = nnx.eval_shape(lambda: gemma.Decoder(cfg, rngs=nnx.Rngs(0)))
  count = layers.num_params(nnx.state(model, nnx.Param))
  print(f"{variant} decoder (scan={scan}): {count:,} parameters")
  assert count == gemma_param_count(cfg) == expected
  if scan:  # stacked axis is named 'layers' (unsharded by the rules table)
    q = nnx.state(model, nnx.Param)["layers"]["local_layer"]["attn"]["q_kernel"]
    assert q.out_sharding == ("layers", "embed", "heads", "head_dim")
    assert q.shape == (cfg.depth // 2, 2304, 8, 256)


@pytest.mark.parametrize("overrides, field", [
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(sliding_window=0), "sliding_window"),   # local_global needs a window
    (dict(remat="maybe"), "remat"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(depth=3, scan=True), "depth"),
    (dict(prefix_token_shift=-1), "prefix_token_shift"),
])
def test_config_validation(overrides, field):
  with pytest.raises(ValueError, match=field):
    dataclasses.replace(GEMMA2_TINY, **overrides)


def test_zero_means_off():
  cfg = dataclasses.replace(GEMMA2_TINY, attn_softcap=0.0, final_softcap=0, query_scale=0.0,
                            sliding_window=0, local_global=False)
  assert (cfg.attn_softcap, cfg.final_softcap, cfg.query_scale, cfg.sliding_window) == (None,) * 4
  assert [GEMMA2_TINY.is_local(i) for i in range(4)] == [True, False, True, False]


# -------------------------------------------------------------------- masks

def reference_mask(input_mask, ar_mask, positions=None, window=None):
  """The big_vision rule, written out with loops."""
  b, s = input_mask.shape
  out = np.zeros((b, s, s), bool)
  for n in range(b):
    seg = np.cumsum(ar_mask[n] & input_mask[n])
    pos = np.cumsum(input_mask[n]) - 1 if positions is None else positions[n]
    for i in range(s):
      for j in range(s):
        out[n, i, j] = (input_mask[n, i] and input_mask[n, j] and seg[j] <= seg[i]
                        and (window is None or abs(pos[i] - pos[j]) < window))
  return out


def test_attention_mask_semantics():
  #             prefix (one invalid slot)   suffix (causal), one padding slot
  input_mask = np.array([[1, 1, 0, 1, 1, 1, 1, 0]], bool)
  ar_mask = np.array([[0, 0, 0, 0, 1, 1, 1, 1]], bool)
  mask = np.asarray(gemma.make_attention_mask(jnp.asarray(input_mask), jnp.asarray(ar_mask)))
  np.testing.assert_array_equal(mask, reference_mask(input_mask, ar_mask))
  m = mask[0]
  prefix, suffix = [0, 1, 3], [4, 5, 6]
  assert m[np.ix_(prefix, prefix)].all()              # bidirectional prefix
  assert not m[np.ix_(prefix, suffix)].any()          # prefix never sees the answer
  assert m[np.ix_(suffix, prefix)].all()              # answer sees the whole prefix
  np.testing.assert_array_equal(m[np.ix_(suffix, suffix)], np.tril(np.ones((3, 3), bool)))
  assert not m[2].any() and not m[:, 2].any() and not m[7].any() and not m[:, 7].any()
  # Window: positions skip the invalid slot, so slots 0 and 4 are 3 positions apart.
  local = np.asarray(gemma.make_attention_mask(jnp.asarray(input_mask), jnp.asarray(ar_mask),
                                               sliding_window=3))
  np.testing.assert_array_equal(local, reference_mask(input_mask, ar_mask, window=3))
  assert m[4, 0] and not local[0, 4, 0] and local[0, 4, 1]


def test_random_masks_match_reference():
  rng, _ = fresh_rng()
  input_mask = rng.random((3, 12)) < 0.7
  ar_mask = rng.random((3, 12)) < 0.4
  got = gemma.make_attention_mask(jnp.asarray(input_mask), jnp.asarray(ar_mask), sliding_window=4)
  np.testing.assert_array_equal(np.asarray(got), reference_mask(input_mask, ar_mask, window=4))


def test_sliding_window_restricts_local_layers_only():
  """Token 10 is >= window positions from token 0: a lone local layer cannot carry
  information between them, a following global layer (or local_global=False) can."""
  s, window = 12, 4
  x = jax.random.normal(jax.random.key(0), (1, s, 128))
  x_perturbed = x.at[:, 0].add(1.0)
  ones, zeros = jnp.ones((1, s), bool), jnp.zeros((1, s), bool)

  def reaches(cfg, params=None):
    model = gemma.Decoder(cfg, rngs=nnx.Rngs(1))
    if params is not None:
      nnx.update(model, params)
    a, _ = forward(model, x, ones, zeros)
    b, _ = forward(model, x_perturbed, ones, zeros)
    return float(jnp.max(jnp.abs(a[0, 10] - b[0, 10]))), nnx.state(model, nnx.Param), a

  only_local, _, _ = reaches(dataclasses.replace(GEMMA2_TINY, depth=1, sliding_window=window))
  assert only_local == 0.0
  delta, params, local_global = reaches(dataclasses.replace(GEMMA2_TINY, sliding_window=window))
  assert delta > 1e-4
  # Same parameters, every layer global: outputs differ (the window mattered) ...
  _, _, all_global = reaches(dataclasses.replace(GEMMA2_TINY, local_global=False), params)
  assert float(jnp.max(jnp.abs(all_global - local_global))) > 1e-3
  # ... and with a window covering the sequence, local == global.
  _, _, wide = reaches(dataclasses.replace(GEMMA2_TINY, sliding_window=s), params)
  assert rel_err(wide, all_global) <= 1e-6


# ------------------------------------------------------- masked-slot invariance

def _insert_invalid(rng, x_compact, ar_compact, prefix_len, num_invalid, tail_pad):
  """Scatters ``num_invalid`` invalid slots (garbage content) among the prefix of each
  example and pads the end. Returns x, input_mask, ar_mask and the index of each valid token."""
  b, s, w = x_compact.shape
  total = s + num_invalid + tail_pad
  x = rng.normal(size=(b, total, w)).astype(np.float32) * 10.0   # must never leak
  input_mask = np.zeros((b, total), bool)
  ar_mask = rng.random((b, total)) < 0.5                         # arbitrary on invalid slots
  where = np.zeros((b, s), int)
  for n in range(b):
    invalid = rng.choice(prefix_len + num_invalid, num_invalid, replace=False)
    valid = np.setdiff1d(np.arange(s + num_invalid), invalid)
    where[n] = valid
    x[n, valid] = x_compact[n]
    input_mask[n, valid] = True
    ar_mask[n, valid] = ar_compact[n]
  return x, input_mask, ar_mask, where


@pytest.mark.parametrize("cfg", [GEMMA1_TINY, dataclasses.replace(GEMMA2_TINY, sliding_window=6)],
                         ids=["gemma1", "gemma2"])
def test_masked_slots_leave_valid_outputs_unchanged(cfg):
  b, prefix_len, suffix_len = 2, 10, 6
  s = prefix_len + suffix_len
  model = gemma.Decoder(cfg, rngs=nnx.Rngs(0))
  for _ in range(3):  # fresh seeds, same shapes (one compile per shape)
    rng, seed = fresh_rng()
    x_c = rng.normal(size=(b, s, cfg.width)).astype(np.float32)
    ar_c = np.broadcast_to(np.arange(s) >= prefix_len, (b, s))
    hidden_c, logits_c = forward(model, x_c, np.ones((b, s), bool), ar_c)
    x, input_mask, ar_mask, where = _insert_invalid(rng, x_c, ar_c, prefix_len, 9, 3)
    hidden, logits = forward(model, x, input_mask, ar_mask)
    take = lambda a: jnp.take_along_axis(a, jnp.asarray(where)[..., None], axis=1)
    assert rel_err(take(hidden), hidden_c) <= 1e-5, seed
    assert rel_err(take(logits), logits_c) <= 1e-5, seed
    chex.assert_tree_all_finite((hidden, logits))


def test_final_softcap_bounds_logits():
  model = gemma.Decoder(GEMMA2_TINY, rngs=nnx.Rngs(0))
  hidden = 50.0 * jax.random.normal(jax.random.key(1), (2, 5, GEMMA2_TINY.width))
  capped = model.logits(hidden)
  uncapped = gemma.Decoder(dataclasses.replace(GEMMA2_TINY, final_softcap=None), rngs=nnx.Rngs(0)).logits(hidden)
  assert float(jnp.max(jnp.abs(uncapped))) > 30.0        # the cap has work to do
  assert float(jnp.max(jnp.abs(capped))) <= 30.0
  np.testing.assert_allclose(capped, 30.0 * jnp.tanh(uncapped / 30.0), rtol=1e-5, atol=1e-5)
  assert capped.dtype == jnp.float32


def test_embed_scales_by_sqrt_width():
  model = gemma.Decoder(GEMMA2_TINY, rngs=nnx.Rngs(0))
  tokens = jnp.array([[1, 5, 127]])
  np.testing.assert_allclose(model.embed(tokens), model.embedding[...][tokens] * np.sqrt(128.0), rtol=1e-6)


def test_prefix_token_shift_matches_reference():
  rng, seed = fresh_rng()
  cfg = dataclasses.replace(GEMMA2_TINY, prefix_token_shift=3)
  model = gemma.Decoder(cfg, rngs=nnx.Rngs(seed))
  taps = rng.standard_normal((3, cfg.width)).astype(np.float32)
  model.token_shift[...] = jnp.asarray(taps)
  tokens = rng.integers(0, cfg.vocab_size, size=(4, 12))
  mask = rng.random((4, 12)) < 0.7          # any pattern: prompts, suffixes, padding
  plain = np.asarray(model.embed(jnp.asarray(tokens)))
  shifted = np.asarray(model.embed(jnp.asarray(tokens), shift_mask=jnp.asarray(mask)))
  expected = plain.copy()
  for n in range(4):
    for t in range(12):
      if mask[n, t]:
        for k in (1, 2, 3):
          if t - k >= 0 and mask[n, t - k]:
            expected[n, t] += taps[k - 1] * plain[n, t - k]
  np.testing.assert_allclose(shifted, expected, rtol=1e-5, atol=1e-4)
  # Unmasked positions (the answer, padding) keep their plain embedding and feed nobody.
  np.testing.assert_array_equal(shifted[~mask], plain[~mask])


def test_prefix_token_shift_initial_taps_and_off():
  cfg = dataclasses.replace(GEMMA2_TINY, prefix_token_shift=2)
  model = gemma.Decoder(cfg, rngs=nnx.Rngs(0))
  np.testing.assert_array_equal(model.token_shift[...], np.ones((2, cfg.width), np.float32))
  tokens = jnp.array([[1, 5, 9, 7]])
  plain = model.embed(tokens)
  np.testing.assert_allclose(model.embed(tokens, shift_mask=jnp.ones((1, 4), bool))[0, 3],
                             plain[0, 3] + plain[0, 2] + plain[0, 1], rtol=1e-6)
  off = gemma.Decoder(GEMMA2_TINY, rngs=nnx.Rngs(0))   # Gemma: no taps, the mask changes nothing
  assert not hasattr(off, "token_shift")
  np.testing.assert_array_equal(off.embed(tokens, shift_mask=jnp.ones((1, 4), bool)), off.embed(tokens))


# ------------------------------------------------------------------ KV cache

@nnx.jit(static_argnames="cache_size")
def _prefill(model, x, input_mask, ar_mask, cache_size):
  return model.prefill(x, input_mask=input_mask, ar_mask=ar_mask, cache_size=cache_size)


@nnx.jit
def _decode(model, token, cache):
  hidden, cache = model.decode_step(model.embed(token), cache)
  return model.logits(hidden[:, 0]), cache


@pytest.mark.parametrize("scan", [False, True])
def test_kv_cache_greedy_decoding_matches_recompute(scan):
  cfg = dataclasses.replace(GEMMA2_TINY, sliding_window=5, scan=scan, depth=4)
  model = gemma.Decoder(cfg, rngs=nnx.Rngs(2))
  rng, seed = fresh_rng()
  b, s, steps = 2, 14, 4
  # Prompt: "visual" vectors with invalid slots inside, then text; the last two tokens causal.
  x = rng.normal(size=(b, s, cfg.width)).astype(np.float32)
  text = rng.integers(0, cfg.vocab_size, (b, 6))
  x[:, -6:] = np.asarray(model.embed(jnp.asarray(text)))
  input_mask = np.ones((b, s), bool)
  input_mask[0, [1, 4, 5]] = False
  input_mask[1, [0, 7]] = False
  ar_mask = np.broadcast_to(np.arange(s) >= s - 2, (b, s))

  hidden, cache = _prefill(model, x, input_mask, ar_mask, s + steps)
  # Reference: the whole sequence recomputed each step, in a fixed buffer of s + steps
  # slots (one compile) whose not-yet-generated tail is invalid; new tokens are causal.
  seq_x = np.concatenate([x, np.zeros((b, steps, cfg.width), np.float32)], axis=1)
  seq_mask = np.concatenate([input_mask, np.zeros((b, steps), bool)], axis=1)
  seq_ar = np.concatenate([ar_mask, np.ones((b, steps), bool)], axis=1)
  ref_hidden, _ = forward(model, seq_x, seq_mask, seq_ar)
  assert rel_err(hidden, ref_hidden[:, :s]) <= 1e-5, seed
  logits = model.logits(hidden[:, -1])
  for step in range(steps):
    token = jnp.argmax(logits, axis=-1)
    seq_x[:, s + step] = np.asarray(model.embed(token[:, None]))[:, 0]
    seq_mask[:, s + step] = True
    _, ref_logits = forward(model, seq_x, seq_mask, seq_ar)
    logits, cache = _decode(model, token[:, None], cache)
    assert rel_err(logits, ref_logits[:, s + step]) <= 1e-5, (seed, step)
    np.testing.assert_array_equal(jnp.argmax(logits, -1), jnp.argmax(ref_logits[:, s + step], -1))
  np.testing.assert_array_equal(cache.index, [s + steps] * b)
  np.testing.assert_array_equal(cache.next_position, input_mask.sum(1) + steps)


# ------------------------------------------------------------- scan / remat

def _loss_and_grads(cfg, params, x, input_mask, ar_mask, probe):
  # Structure only (no eager initialisation); all variables are Params.
  graphdef, state = nnx.split(nnx.eval_shape(lambda: gemma.Decoder(cfg, rngs=nnx.Rngs(9))))
  nnx.replace_by_pure_dict(state, params)

  @jax.jit
  def loss_fn(state):
    m = nnx.merge(graphdef, state)
    logits = m.logits(m(x, input_mask=input_mask, ar_mask=ar_mask))
    return jnp.sum(logits * probe), logits
  (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(state)
  return loss, logits, nnx.to_pure_dict(grads)


@pytest.mark.parametrize("base, variants", [
    (dataclasses.replace(GEMMA2_TINY, depth=4, sliding_window=5),
     [(True, "dots"), (False, "full")]),   # with the reference: scan on/off x remat on/off
    (GEMMA1_TINY, [(True, "full")]),
], ids=["gemma2", "gemma1"])
def test_scan_and_remat_match_unrolled(base, variants):
  rng, _ = fresh_rng()
  b, s = 2, 12
  x = jnp.asarray(rng.normal(size=(b, s, base.width)), jnp.float32)
  input_mask = jnp.asarray(rng.random((b, s)) < 0.8)
  ar_mask = jnp.asarray(np.broadcast_to(np.arange(s) >= 8, (b, s)))
  probe = jnp.asarray(rng.normal(size=(b, s, base.vocab_size)), jnp.float32)
  ref_params = nnx.to_pure_dict(nnx.state(gemma.Decoder(base, rngs=nnx.Rngs(0)), nnx.Param))
  ref_loss, ref_logits, ref_grads = _loss_and_grads(base, ref_params, x, input_mask, ar_mask, probe)
  # The probe loss is a sum of ~1e3 terms of both signs, so it can be far smaller than
  # its terms: bound its error by the terms' magnitude (float32 summation order differs
  # under scan), and compare logits and gradients element-wise in relative norm.
  loss_scale = float(jnp.sum(jnp.abs(ref_logits * probe)))
  for scan, remat in variants:
    cfg = dataclasses.replace(base, scan=scan, remat=remat)
    params = gemma.to_scanned(ref_params, cfg) if scan else ref_params
    loss, logits, grads = _loss_and_grads(cfg, params, x, input_mask, ar_mask, probe)
    if scan:
      grads = gemma.from_scanned(grads, cfg)
    assert abs(float(loss - ref_loss)) <= 1e-5 * loss_scale, (scan, remat)
    assert rel_err(logits, ref_logits) <= 1e-5, (scan, remat)
    assert rel_err(grads, ref_grads) <= 1e-5, (scan, remat)


def test_scanned_layout_round_trip():
  cfg = dataclasses.replace(GEMMA2_TINY, depth=4)
  params = nnx.to_pure_dict(nnx.state(gemma.Decoder(cfg, rngs=nnx.Rngs(0)), nnx.Param))
  scanned = gemma.to_scanned(params, dataclasses.replace(cfg, scan=True))
  abstract = nnx.eval_shape(lambda: gemma.Decoder(dataclasses.replace(cfg, scan=True), rngs=nnx.Rngs(0)))
  chex.assert_trees_all_equal_shapes(scanned, nnx.to_pure_dict(nnx.state(abstract, nnx.Param)))
  chex.assert_trees_all_equal(gemma.from_scanned(scanned, cfg), params)


def test_bfloat16_compute():
  cfg = dataclasses.replace(GEMMA2_TINY, dtype=jnp.bfloat16)
  model = gemma.Decoder(cfg, rngs=nnx.Rngs(0))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
  tokens = jax.random.randint(jax.random.key(1), (2, 10), 0, cfg.vocab_size)
  ones, causal = jnp.ones((2, 10), bool), jnp.arange(10)[None] >= 6
  x = model.embed(tokens)
  hidden, logits = forward(model, x, ones, jnp.broadcast_to(causal, (2, 10)))
  assert x.dtype == hidden.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
  ref_model = gemma.Decoder(GEMMA2_TINY, rngs=nnx.Rngs(0))
  _, ref_logits = forward(ref_model, ref_model.embed(tokens), ones, jnp.broadcast_to(causal, (2, 10)))
  assert rel_err(logits, ref_logits) < 0.05
