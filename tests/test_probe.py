"""Decoder attention maps and the answer-attention probe (analysis/probe.py)."""

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from analysis import probe
from parcel_jax import runs
from parcel_jax.data import synthetic
from parcel_jax.models import gemma
from tests.conftest import run_cli
from tests.test_gemma import GEMMA2_TINY, fresh_rng


def test_attention_maps_are_distributions_over_allowed_keys():
  cfg = dataclasses.replace(GEMMA2_TINY, sliding_window=4, depth=2)  # local then global layer
  model = gemma.Decoder(cfg, rngs=nnx.Rngs(0))
  rng, seed = fresh_rng()
  b, s = 2, 12
  x = jnp.asarray(rng.normal(size=(b, s, cfg.width)), jnp.float32)
  input_mask = np.ones((b, s), bool)
  input_mask[0, [2, 3]] = False
  ar_mask = np.broadcast_to(np.arange(s) >= s - 3, (b, s))
  maps = np.asarray(model.attention_maps(x, input_mask=jnp.asarray(input_mask), ar_mask=jnp.asarray(ar_mask)))
  assert maps.shape == (2, b, cfg.num_heads, s, s)
  positions = gemma.default_positions(jnp.asarray(input_mask))
  allowed = [np.asarray(gemma.make_attention_mask(input_mask, ar_mask, positions, 4)),  # local
             np.asarray(gemma.make_attention_mask(input_mask, ar_mask))]               # global
  for layer in range(2):
    mask = allowed[layer][:, None]
    assert np.all(maps[layer][~np.broadcast_to(mask, maps[layer].shape)] == 0), seed
    rows = maps[layer].sum(-1)
    np.testing.assert_allclose(rows[np.broadcast_to(input_mask[:, None], rows.shape)], 1.0, atol=1e-5,
                               err_msg=f"seed {seed}")
  assert not np.allclose(maps[0], maps[1])  # the window matters: the layers differ
  with pytest.raises(ValueError, match="scan=False"):
    gemma.Decoder(dataclasses.replace(cfg, scan=True), rngs=nnx.Rngs(0)).attention_maps(
        x, input_mask=jnp.asarray(input_mask), ar_mask=jnp.asarray(ar_mask))


def test_attention_maps_use_the_given_positions():
  """RoPE attention depends on content and positions only, so moving tokens in the sequence
  together with their positions permutes the maps; with the default positions it does not."""
  cfg = dataclasses.replace(GEMMA2_TINY, sliding_window=4, depth=2)
  model = gemma.Decoder(cfg, rngs=nnx.Rngs(0))
  rng, seed = fresh_rng()
  b, s = 2, 10
  x = jnp.asarray(rng.normal(size=(b, s, cfg.width)), jnp.float32)
  input_mask = jnp.ones((b, s), bool)
  ar_mask = jnp.zeros((b, s), bool)                        # one bidirectional prefix
  positions = jnp.asarray(np.stack([rng.permutation(s) for _ in range(b)]), jnp.int32)
  perm = rng.permutation(s)
  maps = np.asarray(model.attention_maps(x, input_mask=input_mask, ar_mask=ar_mask, positions=positions))
  moved = np.asarray(model.attention_maps(x[:, perm], input_mask=input_mask, ar_mask=ar_mask,
                                          positions=positions[:, perm]))
  np.testing.assert_allclose(moved, maps[..., perm, :][..., perm], atol=1e-5, err_msg=f"seed {seed}")
  packed = np.asarray(model.attention_maps(x[:, perm], input_mask=input_mask, ar_mask=ar_mask))
  assert not np.allclose(packed, maps[..., perm, :][..., perm], atol=1e-3), seed


def test_asked_items_are_what_the_answer_is_about():
  seen = set()
  for index in range(300):
    ex = synthetic.generate("eval", index)
    asked = probe.asked_items(ex)
    seen.add(ex.family)
    if ex.family == "counting":
      assert len(asked) == synthetic.COUNT_WORDS.index(ex.answer) + 1
    elif ex.family == "mixed":
      assert [it.label for it in asked] == [ex.answer]
    elif ex.family == "grounding":
      assert len(asked) == 1 and f"row{asked[0].cell[0] + 1} col{asked[0].cell[1] + 1}" == ex.answer
    elif ex.family == "detail":
      assert [it.label for it in asked] == [ex.answer]
    else:
      assert asked[0].label == ex.question.split()[3]  # where is the <subject> square ...
  assert seen == set(synthetic.DEFAULT_FAMILIES)   # the eval stream's default mixture


def test_probe_partitions_the_answer_attention(tiny_workdir):
  run = runs.load_run(tiny_workdir)
  for family in ("grounding", "counting"):
    result = probe.answer_attention(run, family, budget=64, num_examples=8)
    total = sum(result["parts"][p] for p in probe.PARTS)
    assert total.shape == (run.model_cfg.decoder.depth, run.model_cfg.decoder.num_heads)
    np.testing.assert_allclose(total, 1.0, atol=1e-5)
    for part in probe.PARTS:
      assert np.all(result["parts"][part] >= 0)
    assert 0 < result["uniform_asked"] < result["uniform_asked"] + result["uniform_other"] < 1
  assert result["uniform_asked"] > 1 / 64  # counting asks about one to four squares
  with pytest.raises(ValueError, match="needs pure 8x8 anchors"):
    probe.answer_attention(run, "grounding", budget=24, num_examples=2)


def test_probe_cli(tiny_workdir):
  out = run_cli("analysis.probe", f"--workdir={tiny_workdir}", "--family=mixed", "--num_examples=4")
  assert out.returncode == 0, out.stderr
  assert "family mixed" in out.stdout and "background" in out.stdout
  rows = [line.split() for line in out.stdout.splitlines() if line.strip()[:1].isdigit()]
  assert len(rows) == 2  # tiny model: 1 layer x 2 heads
  np.testing.assert_allclose([sum(map(float, r[2:])) for r in rows], 1.0, atol=2e-3)
