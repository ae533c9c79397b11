r"""Evaluation wall time: encode each image once vs re-encode it for every budget.

    python -m benchmarks.encode_once [--budgets=16,32,64,128,256] [--num_examples=256] [--repeats=3]

One process, one randomly initialised model (``configs/base.py``: the tiny CPU default,
PARCEL connector), the same eval examples for both modes. Every program is compiled by
a warm-up pass first, so the timings are steady state: ``parcel_jax.evaluate.evaluate``
end to end (data generation, ViT, connector + decoder per budget). Prints the median
time of each mode and the ratio re-encode / encode-once (> 1: encode-once is faster; the
ViT's share of the per-budget work bounds it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax

from configs import base
from parcel_jax import evaluation, runs


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--budgets", default="16,32,64,128,256")
  parser.add_argument("--num_examples", type=int, default=256)
  parser.add_argument("--batch_size", type=int, default=128)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--method", default="parcel")
  args = parser.parse_args()

  config = base.get_config(args.method)
  config.eval.num_examples = args.num_examples
  config.eval.batch_size = args.batch_size
  config.data.num_threads = 0
  run = runs.init_run(config)
  budgets = tuple(int(b) for b in args.budgets.split(","))
  spec, budgets = evaluation.run_budgets(run, budgets)

  def once(encode_once: bool, num_examples: int) -> float:
    cfg = evaluation._with_eval(run.config, num_examples, args.batch_size)
    start = time.perf_counter()
    evaluation.evaluate(run.graphdef, run.params, cfg, spec, budgets, run.mesh, progress=False,
                      encode_once=encode_once)
    return time.perf_counter() - start

  for mode in (True, False):  # compile every program on one batch
    once(mode, args.batch_size)
  times = {True: [], False: []}
  for _ in range(args.repeats):  # interleaved, so load changes hit both modes alike
    for mode in (True, False):
      times[mode].append(once(mode, args.num_examples))
  t_once, t_re = statistics.median(times[True]), statistics.median(times[False])
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; method {run.method}; "
        f"ViT {run.model_cfg.vision.depth}x{run.model_cfg.vision.width}, decoder "
        f"{run.model_cfg.decoder.depth}x{run.model_cfg.decoder.width}; budgets {list(budgets)}; "
        f"{args.num_examples} examples, batch {args.batch_size}; median of {args.repeats}")
  print(f"encode once        {t_once:8.3f} s   ({args.num_examples / t_once:7.1f} examples/s)")
  print(f"re-encode/budget   {t_re:8.3f} s   ({args.num_examples / t_re:7.1f} examples/s)")
  print(f"ratio (re-encode / encode once): {t_re / t_once:.2f}x")


if __name__ == "__main__":
  main()
