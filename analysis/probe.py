r"""Where the answer looks: decoder attention of the answer position over the visual tokens.

    python -m analysis.probe --workdir=RUN [--family=grounding] [--budget=64] [--num_examples=64]

For a run on the synthetic task. At a pure-pooling budget with an 8x8 anchor grid (B = 64 for
``parcel`` and ``m3``) every anchor covers exactly one object slot, so each visual token is one
object or background. For eval examples of one family the probe runs ``[visual; BOS question
SEP]`` and splits the attention of SEP (the position that predicts the first answer word), per
layer and head, into: the asked object(s), the other objects, background anchors and the text.
Uniform attention over the visual tokens would give each anchor 1/B; content-based retrieval
("find the red square") shows up as asked >> n_asked / B.

Library use: ``answer_attention(run, family, budget, num_examples)``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from parcel_jax import generation, runs
from parcel_jax.data import synthetic

PARTS = ("asked", "other_objects", "background", "text")


def asked_items(example: synthetic.Example) -> list[synthetic.Item]:
  """The objects the question is about: grounding / detail the target (item 0), relation the
  subject (item 0; the reference counts as another object), counting every square of the asked
  colour, mixed the glyph in the asked cell."""
  items = list(example.layout.items)
  words = example.question.split()
  if example.family == "counting":  # how many <colour> squares
    return [it for it in items if it.label == words[2]]
  if example.family == "mixed":     # what pattern is in row<r> col<c>
    cell = (int(words[-2][3:]) - 1, int(words[-1][3:]) - 1)
    return [it for it in items if it.cell == cell]
  return items[:1]


def _slot(item: synthetic.Item) -> int:
  return item.row * synthetic.SLOTS + item.col


@functools.partial(jax.jit, static_argnames=("graphdef", "bucket"))
def _maps(graphdef, params, images, prefix, budgets, *, bucket):
  """(depth, b, heads, S) attention of the last prompt token over [visual; prompt]."""
  model = nnx.merge(graphdef, params)
  features = model.encode_images(images)
  x, input_mask = model.decoder_inputs(features, prefix, jnp.ones(prefix.shape, bool),
                                      bucket=bucket, budgets=budgets)
  maps = model.decoder.attention_maps(x, input_mask=input_mask, ar_mask=jnp.zeros_like(input_mask),
                                      positions=model.decoder_positions(features, input_mask, bucket))
  return maps[:, :, :, -1, :]


def answer_attention(run, family: str, budget: int = 64, num_examples: int = 64) -> dict:
  """Mean attention of the answer position per layer and head over ``num_examples`` eval
  examples of ``family``: {"parts": {part: (depth, heads) array}, "uniform_asked": float, ...}."""
  if family not in synthetic.FAMILIES:
    raise ValueError(f"family={family!r} is unknown; allowed: {', '.join(synthetic.FAMILIES)}")
  budget = generation.check_budgets(run, [budget])[0]
  bucket = run.method_space().compact_bucket(budget)
  if bucket.anchor_grid != synthetic.SLOTS or bucket.query_slots:
    raise ValueError(f"budget {budget} of method {run.label()} is {bucket}; the probe needs pure "
                     f"{synthetic.SLOTS}x{synthetic.SLOTS} anchors (one per object slot), e.g. B=64 "
                     "for parcel or m3")
  examples, index = [], 0
  while len(examples) < num_examples:
    ex = synthetic.generate("eval", index, run.image_size)
    index += 1
    if ex.family == family:
      examples.append(ex)
  prefix = np.stack([generation.prompt_tokens(e.question, run.tokenizer) for e in examples])  # one length per family
  images = jnp.asarray(np.stack([e.image for e in examples]))
  maps = np.asarray(_maps(run.graphdef, run.params, images, jnp.asarray(prefix),
                          jnp.full((len(examples),), budget, jnp.int32), bucket=bucket))
  visual = maps[..., :bucket.num_slots]                                  # (depth, b, heads, B)
  asked = np.zeros((len(examples), bucket.num_slots), bool)
  objects = np.zeros_like(asked)
  for i, ex in enumerate(examples):
    asked[i, [_slot(it) for it in asked_items(ex)]] = True
    objects[i, [_slot(it) for it in ex.layout.items]] = True
  per_example = {
      "asked": (visual * asked[None, :, None]).sum(-1),
      "other_objects": (visual * (objects & ~asked)[None, :, None]).sum(-1),
      "background": (visual * ~objects[None, :, None]).sum(-1),
      "text": maps[..., bucket.num_slots:].sum(-1),
  }
  return {"family": family, "budget": budget, "num_examples": len(examples),
          "question": examples[0].question,
          "parts": {k: v.mean(axis=1) for k, v in per_example.items()},  # (depth, heads)
          "uniform_asked": float(asked.sum(1).mean() / bucket.num_slots),
          "uniform_other": float((objects & ~asked).sum(1).mean() / bucket.num_slots)}


def format_report(result: dict) -> str:
  parts = result["parts"]
  depth, heads = parts["asked"].shape
  lines = [f"family {result['family']} (e.g. '{result['question']}'), B = {result['budget']}, "
           f"{result['num_examples']} eval examples: attention of the answer position",
           f"uniform over the visual tokens: asked {result['uniform_asked']:.3f}, "
           f"other objects {result['uniform_other']:.3f}",
           " layer head " + "".join(f"{p:>15}" for p in PARTS)]
  for layer in range(depth):
    for head in range(heads):
      lines.append(f"{layer:6d} {head:4d} " + "".join(f"{parts[p][layer, head]:15.3f}" for p in PARTS))
  return "\n".join(lines)


def main(argv) -> None:
  del argv
  FLAGS = flags.FLAGS
  run = runs.load_run(FLAGS.workdir, FLAGS.step)
  print(format_report(answer_attention(run, FLAGS.family, FLAGS.budget, FLAGS.num_examples)))


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Run directory (its latest checkpoint).", required=True)
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_enum("family", "grounding", list(synthetic.FAMILIES), "Task family to probe.")
  flags.DEFINE_integer("budget", 64, "Visual-token budget (pure 8x8 anchors).")
  flags.DEFINE_integer("num_examples", 64, "Eval examples of the family.")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
