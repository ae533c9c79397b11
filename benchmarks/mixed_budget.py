r"""Serving throughput: mixed-budget batches (grouped by bucket) vs one budget at a time.

    python -m benchmarks.mixed_budget [--requests=96] [--images=48] [--budgets=16,24,...] \
        [--batch_size=8] [--repeats=3] [--config.FIELD=VALUE ...]

One process, one randomly initialised model (``configs/base.py``: the embedded default,
PARCEL connector), the same requests served both ways by ``parcel_jax.serving.Server``:

  mixed     ``grouping="bucket"``: requests of different budgets share a batch and one
            compiled program per bucket (per-row budget masks);
  per-budget ``grouping="budget"``: each budget is batched alone at its compact shape
            (exactly B visual tokens), one program per distinct budget.

Requests draw their budget uniformly from ``--budgets`` (``all``: the method's whole space,
e.g. what a per-request budget policy may pick) and their image from ``--images``
synthetic eval images (so about half re-ask an image: feature-cache hits). Each pass starts
with an empty feature cache (both encode the same images). ``cold``: the first pass of each
mode, compiles included (the ViT encoder is compiled beforehand for both); ``warm``: the
median of ``--repeats`` interleaved passes once everything is compiled. Prints requests/s,
visual tokens/s and the ratio per-budget / mixed time (> 1: mixed batching is faster), and
how many answers the two modes agree on (they must all agree).
"""

from __future__ import annotations

import os
import statistics
import tempfile

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from PIL import Image

from parcel_jax import evaluation, runs, serving
from parcel_jax.data import synthetic

config_flags.DEFINE_config_file("config", "configs/base.py", "Config of the model served.")
flags.DEFINE_integer("requests", 96, "Requests served per pass.")
flags.DEFINE_integer("images", 48, "Distinct images the requests ask about.")
flags.DEFINE_list("budgets", ["16", "24", "32", "48", "64", "96", "128", "160", "192", "256"],
                  "Budgets the requests draw from (uniformly); 'all': every budget of the method's space.")
flags.DEFINE_integer("batch_size", 8, "Rows per batch.")
flags.DEFINE_integer("repeats", 3, "Warm passes per mode (interleaved).")
flags.DEFINE_integer("seed", 0, "Seed of the request draw.")
FLAGS = flags.FLAGS


def _requests(directory: str, count: int, num_images: int, budgets, rng) -> list[serving.Request]:
  paths = []
  for i in range(num_images):
    example = synthetic.generate("eval", i)
    pixels = np.round((example.image + 1) * 127.5).clip(0, 255).astype(np.uint8)
    paths.append(os.path.join(directory, f"eval{i}.png"))
    Image.fromarray(pixels).save(paths[-1])
  out = []
  for line in range(1, count + 1):
    i = int(rng.integers(num_images))
    out.append(serving.Request(line, line, paths[i], synthetic.generate("eval", i).question,
                               int(rng.choice(budgets))))
  return out


def main(argv) -> None:
  del argv
  args = FLAGS
  config = FLAGS.config
  config.data.num_threads = 0
  run = runs.init_run(config)
  space = run.method_space()
  budgets = list(space.budgets) if args.budgets == ["all"] else [int(b) for b in args.budgets]
  outside = [b for b in budgets if b not in space.budgets]
  if outside:
    raise SystemExit(f"error: --budgets {outside} are not in the space of method {run.method!r}")
  rng = np.random.default_rng(args.seed)
  with tempfile.TemporaryDirectory() as directory:
    requests = _requests(directory, args.requests, args.images, budgets, rng)
    # The encoder is the same program in both modes: compile it before either cold pass.
    size = run.image_size
    jax.block_until_ready(evaluation.encode_images(run.graphdef, run.params,
                                                   np.zeros((args.batch_size, size, size, 3), np.float32)))
    modes = {"mixed": "bucket", "per-budget": "budget"}

    def serve(mode):
      server = serving.Server(run, batch_size=args.batch_size, grouping=modes[mode])
      records = server.serve(requests)
      return server.stats, records

    cold = {mode: serve(mode) for mode in modes}
    warm = {mode: [] for mode in modes}
    for _ in range(args.repeats):      # interleaved, so load changes hit both modes alike
      for mode in modes:
        warm[mode].append(serve(mode)[0])

  budgets_text = (f"all {len(budgets)} of the space" if args.budgets == ["all"] else str(budgets))
  answers = {mode: [r.get("answer") for r in cold[mode][1]] for mode in modes}
  agree = sum(a == b for a, b in zip(answers["mixed"], answers["per-budget"]))
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; method {run.method}; "
        f"ViT {run.model_cfg.vision.depth}x{run.model_cfg.vision.width}, decoder "
        f"{run.model_cfg.decoder.depth}x{run.model_cfg.decoder.width}; {args.requests} requests over "
        f"{args.images} images, budgets {budgets_text}, batch {args.batch_size}; warm: median of {args.repeats}")
  times = {}
  for mode in modes:
    c = cold[mode][0]
    t = statistics.median(s.seconds for s in warm[mode])
    times[mode] = (c.seconds, t)
    print(f"{mode:<11} cold {c.seconds:7.2f} s   warm {t:7.3f} s ({args.requests / t:7.1f} requests/s, "
          f"{c.visual_tokens / t:9.0f} visual tokens/s); {c.batches} batches, {len(c.programs)} decode "
          f"programs; image cache {c.cache_hits} hits, {c.images_encoded} encoded")
  print(f"answers equal in both modes: {agree}/{args.requests}")
  print(f"ratio (per-budget / mixed time): warm {times['per-budget'][1] / times['mixed'][1]:.2f}x, "
        f"cold {times['per-budget'][0] / times['mixed'][0]:.2f}x")


if __name__ == "__main__":
  app.run(main)
