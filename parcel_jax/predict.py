r"""Command line: answer a question about an image at one or more visual-token budgets.

    python -m parcel_jax.predict --workdir=RUN --image=cat.png --question="where is the red square" \
        --budget=16,64,256 [--max_new_tokens=N] [--step=S]

prints one line per budget, ``budget B: answer`` (``parcel_jax.generation``: the ViT runs
once, every budget at its compact shape, KV-cache greedy decoding).
"""

from __future__ import annotations

from absl import app, flags

from parcel_jax import cli, generation, runs


def main(argv) -> None:
  del argv
  cli.quiet_library_logs()
  f = flags.FLAGS
  try:
    budgets = [int(b) for b in f.budget]
    run = runs.load_run(f.workdir, f.step)
    image = generation.load_image(f.image, run.image_size)
    answers = generation.generate(run, image, f.question, budgets,
                                  max_new_tokens=f.max_new_tokens or None)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from e
  for b, answer in answers.items():
    print(f"budget {b}: {answer}", flush=True)


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_string("image", None, "Image file (any format PIL reads).")
  flags.DEFINE_string("question", None, "Question, in the tokenizer's words.")
  flags.DEFINE_list("budget", None, "Visual-token budget(s), comma separated.")
  flags.DEFINE_integer("max_new_tokens", 0, "Answer tokens at most (0: data.max_text_len - prompt).")
  flags.mark_flags_as_required(["workdir", "image", "question", "budget"])


if __name__ == "__main__":
  _define_flags()
  app.run(main)
