"""Can the configured decoder learn mixed's lookup, or relation's binding, from clean tokens?

    python -m analysis.lookup_check --config=configs/base.py [--bag_scale=1 --own_scale=0.1]

Isolates the decoder (``config.model.decoder``, optimiser settings from ``config.optim``) from the
vision tower: the 16 "anchors" of a 4x4 grid are a learned embedding of what the cell holds (one
of the 5 glyphs, or nothing), scaled by ``own_scale``, plus ``bag_scale`` times the mean embedding
of every glyph in the image (what global attention in the ViT can spread to every patch), plus
optionally a sin-cos code of the cell; then the mixed question (``what pattern is in rowR colC``)
and its answer. 2 to 4 glyphs per image, as in ``data/synthetic.py``. Prints held-out exact
match every ``--log_every`` steps; the prior of "a glyph that is present" is ~36 %.

``--family=relation`` asks the same of the relation question (``where is the red square relative
to the blue square``): 64 anchors, one per object slot (8x8), each a learned embedding of the
square's colour (or nothing) plus the slot's sin-cos code. The prior is 25 %; 50 % means the
axis is found but not which colour is the subject. ``--context_blocks=N`` runs N ViT blocks over
the anchors first (what the vision tower can compute before the decoder reads them), and
``--config.model.decoder.prefix_token_shift`` switches the decoder's prompt token shift.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from parcel_jax import host_memory, optim
from parcel_jax.data import synthetic
from parcel_jax.models import gemma, layers, vit, vlm

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


# Relation: 64 slot anchors; token ids 0 pad, 1 BOS, 2 SEP, 3 EOS, then these words.
COLOURS = tuple(synthetic.COLOURS)
NUM_SLOTS = synthetic.SLOTS * synthetic.SLOTS
_RELATION_WORDS = ("where", "is", "the", "square", "relative", "to") + COLOURS + synthetic.RELATIONS
RELATION_VOCAB = 4 + len(_RELATION_WORDS)
RELATION_PREFIX = 1 + 10 + 1                 # BOS, "where is the C square relative to the C square", SEP
RELATION_TEXT = RELATION_PREFIX + 2          # answer, EOS


def make_relation_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
  """n relation examples drawn as ``data/synthetic.py`` draws them: slot contents (n, 64) int32
  (colour index, len(COLOURS) = empty) and text (n, RELATION_TEXT) int32."""
  ids = {w: 4 + i for i, w in enumerate(_RELATION_WORDS)}
  cells = np.full((n, NUM_SLOTS), len(COLOURS), np.int32)
  text = np.zeros((n, RELATION_TEXT), np.int32)
  for i in range(n):
    items, question, answer = synthetic._relation(rng)
    for item in items:
      cells[i, item.row * synthetic.SLOTS + item.col] = COLOURS.index(item.label)
    text[i] = [1, *(ids[w] for w in question.split()), 2, ids[answer], 3]
  return cells, text


@dataclasses.dataclass(frozen=True)
class Task:
  grid: int            # anchors per side
  num_contents: int    # what an anchor can hold; the last id is "nothing"
  vocab: int
  prefix: int          # BOS, question, SEP: the answer is predicted from position prefix - 1
  text: int
  make_batch: Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]


TASKS = {
    "mixed": Task(synthetic.CELLS, len(GLYPHS) + 1, VOCAB, PREFIX, TEXT, make_batch),
    "relation": Task(synthetic.SLOTS, len(COLOURS) + 1, RELATION_VOCAB, RELATION_PREFIX,
                     RELATION_TEXT, make_relation_batch),
}


class LookupModel(nnx.Module):
  """Anchors from cell contents -> the configured decoder over ``[anchors; text]``."""

  def __init__(self, task: Task, decoder_cfg: gemma.DecoderConfig, vision_cfg: vit.ViTConfig | None,
               *, position_code: str, own_scale: float, bag_scale: float, rngs: nnx.Rngs):
    width = decoder_cfg.width
    self.task = task
    self.content = nnx.Param(jax.random.normal(rngs.params(), (task.num_contents, width)))
    self.context = nnx.List([vit.ViTBlock(vision_cfg, rngs=rngs)
                             for _ in range(vision_cfg.depth if vision_cfg else 0)])
    self.norm = layers.layer_norm(width, rngs=rngs)
    self.projection = nnx.Linear(width, width, rngs=rngs)
    self.decoder = gemma.Decoder(decoder_cfg, rngs=rngs)
    self.position_code = position_code
    self.own_scale, self.bag_scale = own_scale, bag_scale

  def anchors(self, cells: jax.Array) -> jax.Array:
    """(b, grid**2) -> (b, grid**2, width)."""
    own = self.content[...][cells]
    is_object = (cells < self.task.num_contents - 1)[..., None]
    bag = (own * is_object).sum(1, keepdims=True) / is_object.sum(1, keepdims=True)
    x = self.own_scale * own + self.bag_scale * bag
    if self.position_code == "sincos":   # a fixed code, not a parameter
      x = x + 2.0 * layers.sincos_2d(self.task.grid, x.shape[-1]).astype(x.dtype)
    for block in self.context:
      x = block(x)
    return self.projection(self.norm(x))

  def __call__(self, cells: jax.Array, text: jax.Array) -> jax.Array:
    """(b, grid**2), (b, task.text) -> logits over the text positions (b, task.text, vocab)."""
    prompt = jnp.broadcast_to(jnp.arange(text.shape[1]) < self.task.prefix, text.shape)
    x = jnp.concatenate([self.anchors(cells), self.decoder.embed(text, shift_mask=prompt)], axis=1)
    b, s = x.shape[:2]
    num_anchors = cells.shape[1]
    ar = jnp.arange(s)[None, :] >= num_anchors + self.task.prefix   # answer and EOS: the causal suffix
    hidden = self.decoder(x, input_mask=jnp.ones((b, s), bool), ar_mask=jnp.broadcast_to(ar, (b, s)))
    return self.decoder.logits(hidden[:, num_anchors:])


def run(config, *, steps: int, log_every: int, position_code: str, own_scale: float,
        bag_scale: float, seed: int, family: str = "mixed",
        context_blocks: int = 0) -> list[tuple[int, float]]:
  """Trains and returns [(step, held-out exact match)] every ``log_every`` steps."""
  task = TASKS[family]
  model_cfg = config.model.copy_and_resolve_references()
  model_cfg.decoder.vocab_size = task.vocab
  model = vlm.model_config(model_cfg)
  # Context blocks: the configured ViT block, at the decoder's width, over the anchor grid.
  vision_cfg = dataclasses.replace(model.vision, image_size=task.grid, patch_size=1,
                                   width=model.decoder.width, depth=context_blocks, attn_window=0,
                                   global_blocks=0) if context_blocks else None
  graphdef, state = nnx.split(LookupModel(task, model.decoder, vision_cfg,
                                           position_code=position_code, own_scale=own_scale,
                                           bag_scale=bag_scale, rngs=nnx.Rngs(seed)))
  params = nnx.to_pure_dict(state)
  tx = optim.make_optimizer(config.optim, params, steps)   # the update rule train.py uses
  opt_state = tx.init(params)

  @jax.jit
  def train_step(params, opt_state, cells, text):
    def loss_fn(params):   # predict answer and EOS from SEP and the answer
      logits = nnx.merge(graphdef, params)(cells, text)[:, task.prefix - 1:task.text - 1]
      return optax.softmax_cross_entropy_with_integer_labels(logits, text[:, task.prefix:]).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  @jax.jit
  def answer(params, cells, text):
    return jnp.argmax(nnx.merge(graphdef, params)(cells, text)[:, task.prefix - 1], axis=-1)

  rng = np.random.default_rng(seed)
  eval_cells, eval_text = task.make_batch(np.random.default_rng(10_000 + seed), 512)
  history, start = [], time.time()
  for step in range(1, steps + 1):
    params, opt_state, loss = train_step(params, opt_state,
                                         *task.make_batch(rng, config.train.batch_size))
    if step % log_every == 0 or step == steps:
      em = float(np.mean(np.asarray(answer(params, eval_cells, eval_text)) == eval_text[:, task.prefix]))
      history.append((step, em))
      print(f"step {step} loss {float(loss):.3f} exact match {em:.3f} ({time.time() - start:.0f} s)",
            flush=True)
  return history


def main(argv):
  del argv
  f = flags.FLAGS
  host_memory.configure(f.config.train.host_malloc)  # before JAX's backend starts
  run(f.config, steps=f.steps, log_every=f.log_every, position_code=f.position_code,
      own_scale=f.own_scale, bag_scale=f.bag_scale, seed=f.seed, family=f.family,
      context_blocks=f.context_blocks)


def _define_flags() -> None:
  config_flags.DEFINE_config_file("config", "configs/base.py", "Decoder and optimiser settings.")
  flags.DEFINE_integer("steps", 1000, "Training steps.")
  flags.DEFINE_integer("log_every", 100, "Evaluate every this many steps.")
  flags.DEFINE_enum("position_code", "sincos", ["sincos", "none"],
                    "Cell code added to the anchors (none: RoPE order only).")
  flags.DEFINE_float("own_scale", 1.0, "Weight of a cell's own glyph embedding.")
  flags.DEFINE_float("bag_scale", 0.0, "Weight of the image's mean glyph embedding.")
  flags.DEFINE_integer("seed", 0, "Parameters and training data.")
  flags.DEFINE_enum("family", "mixed", ["mixed", "relation"], "Which question to learn.")
  flags.DEFINE_integer("context_blocks", 0, "ViT blocks over the anchors before the decoder.")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
