r"""Command line: answer questions about images at chosen visual-token budgets.

One question, at one or more budgets:

    python -m parcel_jax.predict --workdir=RUN --image=cat.png --question="where is the red square" \
        --budget=16,64,256 [--max_new_tokens=N] [--step=S]

prints one line per budget, ``budget B: answer`` (``parcel_jax.generation``: the ViT runs
once, every budget at its compact shape, KV-cache greedy decoding). Several images (video
frames), in order, each at the budget: ``--image=f0.png,f1.png`` or ``--image`` repeated.

A file of requests, mixed budgets batched together (``parcel_jax.serving``):

    python -m parcel_jax.predict --workdir=RUN --requests=FILE.jsonl --out=ANSWERS.jsonl \
        [--batch_size=8] [--auto_policy=smallest|scores|cascade|router ...]

each line ``{"id", "image", "question", "budget": int or "auto"}``, with ``"images": [...]``
in place of ``"image"`` for several frames (relative image paths are relative to FILE's
directory); writes one record per request, in order: the answer, or
``{"id", "line", "error"}`` for a request that cannot be served (every other one is still
answered), and prints requests/s, visual tokens/s and the image cache's hits.

``"auto"`` budgets follow ``--auto_policy``: ``smallest`` (the smallest trained budget; the
default), ``scores`` (``--auto_scores=per_example_0.npz``, one budget within
``--auto_tolerance`` of the best), ``cascade`` (``--cascade_threshold``, ``--cascade_budgets``,
``--cascade_confidence``: answer again at the next budget while unsure) or ``router``
(``--router``, default RUN/policies/router.safetensors from ``compare_policies``).
"""

from __future__ import annotations

import os

import numpy as np
from absl import app, flags

from parcel_jax import cli, generation, policies, runs, scores, serving
from parcel_jax import config as config_lib
from parcel_jax import router as router_lib

AUTO_POLICIES = ("smallest", "scores", "cascade", "router")


def _single(run, f) -> None:
  budgets = [int(b) for b in f.budget]
  files = [p for arg in f.image for p in arg.split(",") if p]
  frames = [generation.load_image(p, run.image_size) for p in files]
  image = frames[0] if len(frames) == 1 else np.stack(frames)
  answers = generation.generate(run, image, f.question, budgets, max_new_tokens=f.max_new_tokens or None)
  for b, answer in answers.items():
    print(f"budget {b}: {answer}", flush=True)


def auto_policy(run, f):
  """The policy for ``"auto"`` requests that the flags name (None: the server's default)."""
  name = f.auto_policy or ("scores" if f.auto_scores else "smallest")
  if name != "scores" and f.auto_scores:
    raise ValueError(f"--auto_scores is read by --auto_policy=scores, not {name}")
  if name == "smallest":
    return None
  if name == "scores":
    if not f.auto_scores:
      raise ValueError("--auto_policy=scores needs --auto_scores=per_example_<i>.npz (evaluate --per_example)")
    return serving.policy_from_scores(scores.load(f.auto_scores), f.auto_tolerance)
  if name == "cascade":
    ladder = ([int(b) for b in f.cascade_budgets] if f.cascade_budgets
              else sorted(config_lib.eval_budgets(run.config, run.spec)))   # compare_policies' default
    return policies.Cascade(tuple(ladder), f.cascade_threshold, f.cascade_confidence)
  path = f.router or os.path.join(f.workdir, "policies", "router.safetensors")
  return serving.router_policy(router_lib.load(path), run.tokenizer, f.router_threshold)


def _batch(run, f) -> None:
  requests = serving.read_requests(f.requests)
  policy = auto_policy(run, f)
  server = serving.Server(run, batch_size=f.batch_size, max_new_tokens=f.max_new_tokens or None,
                          policy=policy)
  records = server.serve(requests)
  serving.write_records(f.out, records)
  for record in records:
    if "error" in record:
      print(f"skipped {serving.describe(record['line'], record['id'])}: {record['error']}", flush=True)
  print(f"served {server.stats.line()}", flush=True)
  print(f"wrote {f.out}", flush=True)


def main(argv) -> None:
  del argv
  cli.quiet_library_logs()
  f = flags.FLAGS
  single = (f.image, f.question, f.budget)
  if f.requests:
    if any(single):
      raise SystemExit("error: --requests replaces --image, --question and --budget; give one or the other")
    if not f.out:
      raise SystemExit("error: --requests needs --out=ANSWERS.jsonl")
  elif not all(single):
    raise SystemExit("error: give --image, --question and --budget, or --requests and --out")
  try:
    run = runs.load_run(f.workdir, f.step)
    _batch(run, f) if f.requests else _single(run, f)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from e


def _define_flags() -> None:
  flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_multi_string("image", None, "Image file (any format PIL reads); several (frames, "
                            "in order): comma separated or the flag repeated.")
  flags.DEFINE_string("question", None, "Question, in the tokenizer's words.")
  flags.DEFINE_list("budget", None, "Visual-token budget(s), comma separated.")
  flags.DEFINE_integer("max_new_tokens", 0, "Answer tokens at most (0: data.max_text_len - prompt).")
  flags.DEFINE_string("requests", None, "JSONL file of requests {id, image (or images: "
                      "frames), question, budget}.")
  flags.DEFINE_string("out", None, "With --requests: the answers' JSONL file.")
  flags.DEFINE_integer("batch_size", 8, "With --requests: rows per batch (every batch is padded to it).")
  flags.DEFINE_string("auto_scores", None, "With --requests: per-example scores (.npz from evaluate "
                      "--per_example) that choose the budget of 'auto' requests (default: the "
                      "smallest trained budget).")
  flags.DEFINE_float("auto_tolerance", 0.01, "With --auto_scores: the smallest budget within this "
                     "exact match of the best.")
  flags.DEFINE_enum("auto_policy", None, list(AUTO_POLICIES), "With --requests: how 'auto' budgets are "
                    "chosen (default: scores with --auto_scores, else smallest).")
  flags.DEFINE_float("cascade_threshold", 0.5, "--auto_policy=cascade: answer again at the next budget "
                     "while the confidence is below this.")
  flags.DEFINE_list("cascade_budgets", None, "--auto_policy=cascade: the ladder, ascending (default: the "
                    "run's eval.budgets it was trained on).")
  flags.DEFINE_enum("cascade_confidence", "answer_prob", list(policies.CONFIDENCES),
                    "--auto_policy=cascade: the answer's confidence compared with the threshold.")
  flags.DEFINE_string("router", None, "--auto_policy=router: the router file (default: "
                      "WORKDIR/policies/router.safetensors, written by compare_policies).")
  flags.DEFINE_float("router_threshold", None, "--auto_policy=router: the threshold (default: the router's).")
  flags.mark_flags_as_required(["workdir"])


if __name__ == "__main__":
  _define_flags()
  app.run(main)
