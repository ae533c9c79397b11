"""Can the configured decoder learn the ``mixed`` lookup from clean visual tokens?

    python -m parcel_jax.lookup_check --config=configs/base.py [--bag_scale=1 --own_scale=0.1]

Isolates the decoder (``config.model.decoder``, optimiser settings from ``config.optim``) from the
vision tower: the 16 "anchors" of a 4x4 grid are a learned embedding of what the cell holds (one
of the 5 glyphs, or nothing), scaled by ``own_scale``, plus ``bag_scale`` times the mean embedding
of every glyph in the image (what global attention in the ViT can spread to every patch), plus
optionally a sin-cos code of the cell; then the mixed question (``what pattern is in rowR colC``)
and its answer. 2 to 4 glyphs per image, as in ``data/synthetic.py``. Prints held-out exact
match every ``--log_every`` steps; the prior of "a glyph that is present" is ~36 %.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from parcel_jax import host_memory, optim
from parcel_jax.data import synthetic
from parcel_jax.models import gemma, layers, vlm

_CONFIG = config_flags.DEFINE_config_file("config", "configs/base.py", "Decoder and optimiser settings.")
_STEPS = flags.DEFINE_integer("steps", 1000, "Training steps.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 100, "Evaluate every this many steps.")
_POSITION_CODE = flags.DEFINE_enum("position_code", "sincos", ["sincos", "none"],
                                   "Cell code added to the anchors (none: RoPE order only).")
_OWN_SCALE = flags.DEFINE_float("own_scale", 1.0, "Weight of a cell's own glyph embedding.")
_BAG_SCALE = flags.DEFINE_float("bag_scale", 0.0, "Weight of the image's mean glyph embedding.")
_SEED = flags.DEFINE_integer("seed", 0, "Parameters and training data.")

NUM_CELLS = synthetic.CELLS * synthetic.CELLS
GLYPHS = tuple(synthetic.GLYPHS)
# Token ids: 0 pad, 1 BOS, 2 SEP, 3 EOS, then question words, rows, columns, glyphs.
_QUESTION = ("what", "pattern", "is", "in")
_ROW0 = 4 + len(_QUESTION)
_COL0 = _ROW0 + synthetic.CELLS
_GLYPH0 = _COL0 + synthetic.CELLS
VOCAB = _GLYPH0 + len(GLYPHS)
PREFIX = 1 + len(_QUESTION) + 2 + 1   # BOS, question, row, col, SEP
TEXT = PREFIX + 2                     # answer, EOS


def make_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
  """n examples: cell contents (n, 16) int32 (glyph index, len(GLYPHS) = empty) and text (n, TEXT)
  int32 ``BOS what pattern is in rowR colC SEP glyph EOS``."""
  cells = np.full((n, NUM_CELLS), len(GLYPHS), np.int32)
  text = np.zeros((n, TEXT), np.int32)
  for i in range(n):
    count = int(rng.integers(2, 5))
    where = rng.choice(NUM_CELLS, count, replace=False)
    names = rng.choice(len(GLYPHS), count, replace=False)
    cells[i, where] = names
    k = int(rng.integers(count))
    row, col = divmod(int(where[k]), synthetic.CELLS)
    text[i] = [1, *range(4, _ROW0), _ROW0 + row, _COL0 + col, 2, _GLYPH0 + names[k], 3]
  return cells, text


class LookupModel(nnx.Module):
  """Anchors from cell contents -> the configured decoder over ``[anchors; text]``."""

  def __init__(self, decoder_cfg: gemma.DecoderConfig, *, position_code: str, own_scale: float,
               bag_scale: float, rngs: nnx.Rngs):
    width = decoder_cfg.width
    self.content = nnx.Param(jax.random.normal(rngs.params(), (len(GLYPHS) + 1, width)))
    self.norm = layers.layer_norm(width, rngs=rngs)
    self.projection = nnx.Linear(width, width, rngs=rngs)
    self.decoder = gemma.Decoder(decoder_cfg, rngs=rngs)
    self.position_code = position_code
    self.own_scale, self.bag_scale = own_scale, bag_scale

  def anchors(self, cells: jax.Array) -> jax.Array:
    """(b, 16) -> (b, 16, width)."""
    own = self.content[...][cells]
    is_glyph = (cells < len(GLYPHS))[..., None]
    bag = (own * is_glyph).sum(1, keepdims=True) / is_glyph.sum(1, keepdims=True)
    x = self.own_scale * own + self.bag_scale * bag
    if self.position_code == "sincos":   # a fixed code, not a parameter
      x = x + 2.0 * layers.sincos_2d(synthetic.CELLS, x.shape[-1]).astype(x.dtype)
    return self.projection(self.norm(x))

  def __call__(self, cells: jax.Array, text: jax.Array) -> jax.Array:
    """(b, 16), (b, TEXT) -> logits over the text positions (b, TEXT, vocab)."""
    x = jnp.concatenate([self.anchors(cells), self.decoder.embed(text)], axis=1)
    b, s = x.shape[:2]
    ar = jnp.arange(s)[None, :] >= NUM_CELLS + PREFIX     # answer and EOS are the causal suffix
    hidden = self.decoder(x, input_mask=jnp.ones((b, s), bool), ar_mask=jnp.broadcast_to(ar, (b, s)))
    return self.decoder.logits(hidden[:, NUM_CELLS:])


def run(config, *, steps: int, log_every: int, position_code: str, own_scale: float,
        bag_scale: float, seed: int) -> list[tuple[int, float]]:
  """Trains and returns [(step, held-out exact match)] every ``log_every`` steps."""
  model_cfg = config.model.copy_and_resolve_references()
  model_cfg.decoder.vocab_size = VOCAB
  decoder_cfg = vlm.model_config(model_cfg).decoder
  graphdef, state = nnx.split(LookupModel(decoder_cfg, position_code=position_code,
                                           own_scale=own_scale, bag_scale=bag_scale,
                                           rngs=nnx.Rngs(seed)))
  params = nnx.to_pure_dict(state)
  tx = optim.make_optimizer(config.optim, params, steps)   # the update rule train.py uses
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, cells, text):
    def loss_fn(params):   # predict answer and EOS from SEP and the answer
      logits = nnx.merge(graphdef, params)(cells, text)[:, PREFIX - 1:TEXT - 1]
      return optax.softmax_cross_entropy_with_integer_labels(logits, text[:, PREFIX:]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def answer(params, cells, text):
    return jnp.argmax(nnx.merge(graphdef, params)(cells, text)[:, PREFIX - 1], axis=-1)

  rng = np.random.default_rng(seed)
  eval_cells, eval_text = make_batch(np.random.default_rng(10_000 + seed), 512)
  history, start = [], time.time()
  for step in range(1, steps + 1):
    params, opt_state, loss = train_step(params, opt_state, *make_batch(rng, config.train.batch_size))
    if step % log_every == 0 or step == steps:
      em = float(np.mean(np.asarray(answer(params, eval_cells, eval_text)) == eval_text[:, PREFIX]))
      history.append((step, em))
      print(f"step {step} loss {float(loss):.3f} exact match {em:.3f} ({time.time() - start:.0f} s)",
            flush=True)
  return history


def main(argv):
  del argv
  host_memory.configure(_CONFIG.value.train.host_malloc)  # before JAX's backend starts
  run(_CONFIG.value, steps=_STEPS.value, log_every=_LOG_EVERY.value,
      position_code=_POSITION_CODE.value, own_scale=_OWN_SCALE.value, bag_scale=_BAG_SCALE.value,
      seed=_SEED.value)


if __name__ == "__main__":
  app.run(main)
