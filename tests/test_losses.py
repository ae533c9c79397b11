"""The chunked loss equals the full-logits loss: value, token count, exact match and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from parcel_jax import losses


def _head(table, cap=30.0):
  return lambda h: cap * jnp.tanh(jnp.einsum("bld,vd->blv", h, table) / cap)


@pytest.mark.parametrize("chunk", [1, 3, 4, 7, 16])
def test_chunked_loss_equals_full_logits(chunk):
  rng = np.random.default_rng(chunk)
  b, length, d, vocab = 3, 7, 8, 50
  hidden = jnp.asarray(rng.normal(size=(b, length, d)), jnp.float32)
  table = jnp.asarray(rng.normal(size=(vocab, d)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, vocab, size=(b, length)), jnp.int32)
  mask = jnp.asarray(rng.random((b, length)) < 0.6)
  # Example 0 answers exactly (its targets are the argmax), so exact match is not all-False.
  best = jnp.argmax(_head(table)(hidden), -1)
  targets = targets.at[0].set(best[0])

  def full(hidden, table):
    logits = _head(table)(hidden)
    l, c = losses.token_loss(logits, targets, mask)
    return l, (c, losses.exact_match(logits, targets, mask))

  def chunked(hidden, table):
    l, c, em = losses.chunked_token_loss(hidden, targets, mask, _head(table), chunk)
    return l, (c, em)

  (l0, (c0, em0)), g0 = jax.value_and_grad(full, argnums=(0, 1), has_aux=True)(hidden, table)
  (l1, (c1, em1)), g1 = jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True)(hidden, table)
  np.testing.assert_allclose(l1, l0, rtol=1e-5)
  assert float(c1) == float(c0) == float(mask.sum())
  np.testing.assert_array_equal(em1, em0)
  assert bool(em0[0])
  for a, b_ in zip(g1, g0):
    np.testing.assert_allclose(a, b_, rtol=1e-4, atol=1e-6)
