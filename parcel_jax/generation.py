r"""Greedy answers to a question about an image at one or more visual-token budgets.

The command line is ``parcel_jax.predict``. The image is encoded by the ViT once (once per
budget for a method that encodes per budget, ``BudgetSpec.encoding_bucket``);
every budget then runs at its compact shape (exactly B visual tokens): connector ->
projection -> ``decoder.prefill`` over ``[visual; BOS question SEP]`` (the PaliGemma
prefix, attended bidirectionally) -> greedy ``decode_step``s with the KV cache until
EOS or ``max_new_tokens``.

Use: ``generate(run, image, question, budgets)`` with a ``runs.Run``. ``decode_batch``
decodes a batch whose rows have their own budgets and prompt lengths in one bucket
(``parcel_jax.serving`` batches requests of mixed budgets with it).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx

from parcel_jax import budgets as budgets_lib
from parcel_jax import evaluation
from parcel_jax.data import images
from parcel_jax.data import tokenizer as tokenizer_lib


def decode_image(data: bytes, size: int, name: str = "image") -> np.ndarray:
  """Image file bytes (any format Pillow reads) -> float32 (size, size, 3) in [-1, 1], decoded
  exactly as the training pipeline decodes them (``data.images.decode_image``: no train/serve
  skew). ValueError naming ``name`` if they are not a readable image."""
  try:
    return images.decode_image(data, size)
  except images.BadExample as e:
    raise ValueError(f"{name} is not a readable image ({e.kind.replace('_', ' ')})") from e


def read_file(path: str) -> bytes:
  """The bytes of ``path``; FileNotFoundError naming it if it is missing or not a file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"image {path} does not exist")
  with open(path, "rb") as f:
    return f.read()


def load_image(path: str, size: int) -> np.ndarray:
  """Reads any PIL-readable image as RGB, resized to (size, size): float32 (size, size, 3) in [-1, 1]."""
  return decode_image(read_file(path), size, f"image {path}")


def prompt_tokens(question: str, tokenizer=None) -> np.ndarray:
  """The prefix ``[BOS, q..., SEP]`` as int32 (L,), as the data pipeline lays it out
  (Gemma's separator is the "\\n" token). Default tokenizer: the synthetic word list,
  whose unknown words become UNK (logged)."""
  tokenizer = tokenizer or tokenizer_lib.synthetic_tokenizer()
  ids = tokenizer_lib.prompt_ids(tokenizer, question)
  if isinstance(tokenizer, tokenizer_lib.WordTokenizer):
    # One id per whitespace-separated word, between BOS and the one-token SEP.
    unknown = [w for w, i in zip(question.split(), ids[1:-1]) if i == tokenizer.unk_id]
    if unknown:
      logging.warning("words outside the tokenizer's vocabulary (encoded as <unk>): %s", unknown)
  return np.asarray(ids, np.int32)


def prefill(model, features, prefix, prefix_mask, budgets, *, bucket, cache_size):
  """The serving prefill: features (b, g, g, Dv), prefix and its mask (b, L), budgets (b,) ->
  the last position's logits (b, vocab) and a KV cache of ``cache_size`` slots.

  The sequence is [visual (bucket.num_slots); prefix (L)], all prefix-LM (bidirectional)."""
  x, input_mask = model.decoder_inputs(features, prefix, prefix_mask, bucket=bucket, budgets=budgets)
  hidden, cache = model.decoder.prefill(x, input_mask=input_mask, ar_mask=jnp.zeros_like(input_mask),
                                        cache_size=cache_size,
                                        positions=model.decoder_positions(features, input_mask, bucket))
  return model.decoder.logits(hidden[:, -1]), cache


# ------------------------------------------------------------- jitted pieces

@functools.partial(jax.jit, static_argnames=("graphdef", "bucket", "cache_size"))
def _prefill(graphdef, params, features, prefix, budgets, *, bucket, cache_size, prefix_mask=None):
  """``prefill``: the logits of the first answer token (b, vocab) and the KVCache;
  ``prefix_mask`` None: every prefix position is valid."""
  if prefix_mask is None:
    prefix_mask = jnp.ones(prefix.shape, bool)
  return prefill(nnx.merge(graphdef, params), features, prefix, prefix_mask, budgets,
                 bucket=bucket, cache_size=cache_size)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "eos_id", "stop_at_eos",
                                             "keep_logits"))
def _decode(graphdef, params, first_logits, cache, *, max_new_tokens, eos_id, stop_at_eos,
            keep_logits=False):
  """Greedy decoding from the first answer token's logits (b, vocab): tokens (b, T) int32,
  each emitted token's log-probability (b, T) float32 and, with ``keep_logits``, the logits
  every token was chosen from (b, T, vocab) (else None); T = ``max_new_tokens``.

  Token i is emitted, then fed through ``decode_step`` to produce token i + 1. With
  ``stop_at_eos`` the loop ends once every row has emitted EOS (later slots hold EOS,
  log-probability 0 and logits 0).

  The model is merged inside the loop body, not around the loop: NNX variables belong to
  the trace level they were created at, and a scanned decoder (``decoder.scan=True``) passes
  its layers to ``nnx.scan``, which refuses variables from an outer trace."""
  b, vocab = first_logits.shape

  def cond(state):
    i, done = state[0], state[-1]
    return (i < max_new_tokens) & ~(stop_at_eos & jnp.all(done))

  def body(state):
    i, logits, cache, tokens, logprobs, kept, done = state
    token = jnp.argmax(logits, -1).astype(jnp.int32)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
    tokens = tokens.at[:, i].set(token)
    logprobs = logprobs.at[:, i].set(logp)
    if keep_logits:
      kept = kept.at[:, i].set(logits)
    done = done | (token == eos_id)
    decoder = nnx.merge(graphdef, params).decoder
    hidden, cache = decoder.decode_step(decoder.embed(token[:, None]), cache)
    return i + 1, decoder.logits(hidden[:, 0]), cache, tokens, logprobs, kept, done

  tokens = jnp.full((b, max_new_tokens), eos_id, jnp.int32)
  logprobs = jnp.zeros((b, max_new_tokens), jnp.float32)
  kept = jnp.zeros((b, max_new_tokens if keep_logits else 0, vocab), jnp.float32)
  state = (jnp.int32(0), first_logits.astype(jnp.float32), cache, tokens, logprobs, kept,
           jnp.zeros((b,), bool))
  _, _, _, tokens, logprobs, kept, _ = jax.lax.while_loop(cond, body, state)
  return tokens, logprobs, (kept if keep_logits else None)


def decode_batch(run, features, prefix, prefix_mask, budgets, *, bucket, max_new_tokens: int,
                 stop_at_eos: bool = True, keep_logits: bool = False) -> dict:
  """KV-cache greedy decoding of a batch whose rows may have different budgets and prompts.

  Every row's budget must be served by ``bucket`` (slots beyond a row's budget are masked,
  as in training); prompts shorter than the batch's are left-padded (``prefix_mask`` False),
  so each row's last prefix position is its SEP. A row's answer equals that row decoded
  alone at its compact bucket (masked slots and padding are invisible to the decoder).

  Args:
    features: (b, g, g, Dv) ViT features, or (b, T, g, g, Dv) for T frames each at its row's
      budget; prefix, prefix_mask: (b, L) int32 / bool;
      budgets: (b,) int32; bucket: a ``budgets.Bucket`` serving every row's budget.
  Returns:
    ``{"tokens": (b, T) int32, "logprobs": (b, T) float32, "logits": (b, T, vocab) or
    None}`` as numpy, T = ``max_new_tokens`` (see ``_decode``).
  """
  prefix = jnp.asarray(prefix, jnp.int32)
  length = prefix.shape[1]
  visual = bucket.num_slots * (features.shape[1] if features.ndim == 5 else 1)   # T*slots for frames
  logits, cache = _prefill(run.graphdef, run.params, features, prefix, jnp.asarray(budgets, jnp.int32),
                           bucket=bucket, cache_size=visual + length + max_new_tokens,
                           prefix_mask=jnp.asarray(prefix_mask, bool))
  tokens, logprobs, kept = _decode(run.graphdef, run.params, logits, cache,
                                   max_new_tokens=max_new_tokens, eos_id=run.tokenizer.eos_id,
                                   stop_at_eos=stop_at_eos, keep_logits=keep_logits)
  return {"tokens": np.asarray(tokens), "logprobs": np.asarray(logprobs),
          "logits": None if kept is None else np.asarray(kept)}


# ------------------------------------------------------------------ generate

def check_budgets(run, budgets) -> list[int]:
  """Budgets as ints; ValueError naming the allowed ones if any is outside the method's space."""
  space, budgets = run.method_space(), [int(b) for b in budgets]
  bad = [b for b in budgets if b not in space.budgets]
  if bad:
    raise ValueError(f"budget(s) {bad} not valid for method {run.method!r}; allowed: "
                     f"{budgets_lib._describe(space.budgets)}")
  untrained = [b for b in budgets if b not in run.spec.budgets]
  if untrained:
    logging.warning("budget(s) %s are outside the budgets %s was trained on", untrained, run.label())
  return budgets


def greedy_tokens(run, features, prefix: np.ndarray, budget: int, max_new_tokens: int,
                  *, stop_at_eos: bool = True) -> np.ndarray:
  """KV-cache greedy decoding for one budget.

  Args:
    features: (b, g, g, Dv) ViT features; prefix: (b, L) int32 prompt tokens.
  Returns:
    (b, max_new_tokens) int32 answer tokens (after EOS: EOS).
  """
  prefix = np.asarray(prefix, np.int32)
  out = decode_batch(run, features, prefix, np.ones(prefix.shape, bool),
                     np.full((prefix.shape[0],), budget, np.int32),
                     bucket=run.method_space().compact_bucket(budget),  # exactly B visual tokens
                     max_new_tokens=max_new_tokens, stop_at_eos=stop_at_eos)
  return out["tokens"]


def generate(run, image: np.ndarray, question: str, budgets, *,
             max_new_tokens: int | None = None) -> dict[int, str]:
  """Greedy answers to ``question`` about ``image`` at every budget.

  Args:
    run: a ``runs.Run``.
    image: (S, S, 3) float in [-1, 1] at the model resolution (``load_image``), or frames
      (T, S, S, 3) (video, or several images), each at the budget, in order.
    budgets: visual-token budgets, each in the method's space.
    max_new_tokens: default ``data.max_text_len`` minus the prompt (the training length).
  Returns:
    {budget: answer text (up to EOS)}.
  """
  image = np.asarray(image, np.float32)
  expected = (run.image_size, run.image_size, 3)
  if image.shape[-3:] != expected or image.ndim not in (3, 4):
    raise ValueError(f"image has shape {image.shape}; the model expects {expected} or frames "
                     f"(T, *{expected}) (see load_image)")
  if image.ndim == 4 and len(image) > run.config.data.get("max_frames", 1):
    logging.warning("%d frames; %s was trained on at most %d per example", len(image),
                    run.label(), run.config.data.get("max_frames", 1))
  tokenizer = run.tokenizer
  prefix = prompt_tokens(question, tokenizer)[None]
  if max_new_tokens is None:
    max_new_tokens = max(run.config.data.max_text_len - prefix.shape[1], 1)
  budgets = check_budgets(run, budgets)  # before anything compiles
  space, encoded = run.method_space(), {}   # once, or once per budget (``encoding_bucket``)
  answers = {}
  for b in budgets:
    key = space.encoding_bucket(b)
    if key not in encoded:
      encoded[key] = evaluation.encode_images(run.graphdef, run.params, jnp.asarray(image)[None], key)
    answers[b] = tokenizer.decode(greedy_tokens(run, encoded[key], prefix, b, max_new_tokens)[0])
  return answers
