"""Suffix cross-entropy and exact match: the one definition training and evaluation share.

Logits are (b, L, vocab) over the text positions; ``targets`` (b, L) are the next tokens
and ``loss_mask`` (b, L) marks the answer (suffix) positions the loss covers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def token_cross_entropy(logits, targets):
  """(b, L) float32 cross-entropy of every position (computed in float32)."""
  return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def token_loss(logits, targets, loss_mask):
  """Summed cross-entropy and token count over the suffix (scalars)."""
  mask = loss_mask.astype(jnp.float32)
  return jnp.sum(token_cross_entropy(logits, targets) * mask), jnp.sum(mask)


def exact_match(logits, targets, loss_mask):
  """(b,) bool: every suffix token is the argmax. Equals greedy decoding producing
  exactly the answer and EOS, because greedy decoding feeds back only its own
  (then correct) tokens."""
  hit = (jnp.argmax(logits, -1) == targets) | ~loss_mask.astype(bool)
  return jnp.all(hit, axis=-1)


def per_example_scores(logits, targets, loss_mask) -> dict:
  """Per example (b,): exact match, summed suffix loss, correct and total suffix tokens."""
  mask = loss_mask.astype(jnp.float32)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  return {"em": exact_match(logits, targets, loss_mask),
          "loss": jnp.sum(token_cross_entropy(logits, targets) * mask, -1),
          "correct": jnp.sum(correct * mask, -1), "tokens": jnp.sum(mask, -1)}


def chunked_token_loss(hidden, targets, loss_mask, logits_fn, chunk: int):
  """``token_loss`` and ``exact_match`` from hidden states, ``chunk`` positions at a time.

  The full (b, L, vocab) logits never exist: each chunk's logits are computed, reduced and
  dropped, and rematerialised in the backward pass (with a 257k vocabulary the logits and
  their gradient are most of a PaliGemma step's activation memory).

  Args:
    hidden: (b, L, width) at the text positions; targets, loss_mask: (b, L).
    logits_fn: hidden (b, c, width) -> float32 logits (b, c, vocab).
    chunk: positions per chunk (L is padded up to a multiple; padding is masked).
  Returns: (summed suffix cross-entropy, suffix token count, (b,) bool exact match).
  """
  b, length = targets.shape
  n = -(-length // chunk)
  pad = n * chunk - length
  hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, pad)))
  loss_mask = jnp.pad(loss_mask.astype(bool), ((0, 0), (0, pad)))
  to_chunks = lambda x: jnp.swapaxes(x.reshape(b, n, chunk, *x.shape[2:]), 0, 1)

  @jax.checkpoint
  def body(carry, xs):
    loss_sum, count, hit = carry
    h, t, m = xs
    logits = logits_fn(h)
    l, c = token_loss(logits, t, m)
    return (loss_sum + l, count + c, hit & exact_match(logits, t, m)), None

  init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jnp.ones((b,), bool))
  (loss_sum, count, hit), _ = jax.lax.scan(body, init, tuple(map(to_chunks, (hidden, targets, loss_mask))))
  return loss_sum, count, hit
