"""MFU of the embedded default's train step on the local CPU.

    python -m benchmarks.mfu [--config.train.batch_size=64 ...]

Achieved FLOP/s of the jitted train step (XLA's FLOP count of each compiled bucket
program, steps weighted by how often the sampler visits each bucket) over the FLOP/s
of a large jitted float32 matmul, both measured in this process, interleaved, so a
shared, noisy machine affects both alike. Prints the ratio.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from parcel_jax import budgets as budgets_lib
from parcel_jax import flops as flops_lib

from benchmarks import common

config_flags.DEFINE_config_file("config", "configs/base.py", "Config to measure.")
flags.DEFINE_integer("repeats", 5, "Timed steps per bucket.")
flags.DEFINE_integer("matmul_size", 1024, "Side of the reference matmul.")
FLAGS = flags.FLAGS


def time_matmul(size: int) -> float:
  a = jnp.ones((size, size), jnp.float32)
  mm = jax.jit(lambda x, y: x @ y)
  mm(a, a).block_until_ready()
  t = time.perf_counter()
  mm(a, a).block_until_ready()
  return 2 * size ** 3 / (time.perf_counter() - t)


def main(argv):
  del argv
  config = FLAGS.config
  setup = common.train_step_setup(config)
  spec, params, opt_state, batch, jitted = (setup.spec, setup.params, setup.opt_state,
                                            setup.batch, setup.step)
  # How often training visits each bucket (the sampler over 2000 steps).
  visits = {}
  for step in range(2000):
    bucket, _ = budgets_lib.sample_step(spec, config.seed, step, 1)
    visits[bucket] = visits.get(bucket, 0) + 1
  total_flops = total_time = peak_flops = 0.0
  print(f"{'bucket':>10} {'visits':>7} {'step ms':>9} {'GFLOP':>8} {'GFLOP/s':>9} {'matmul GFLOP/s':>15}")
  for bucket, n in sorted(visits.items()):
    budget = max(b for b in spec.budgets if spec.bucket(b) == bucket)
    budgets = jnp.full((config.train.batch_size,), budget, jnp.int32)
    compiled = jitted.lower(params, opt_state, batch, budgets, bucket=bucket).compile()
    flops = flops_lib.compiled_flops(compiled)
    params, opt_state, m = compiled(params, opt_state, batch, budgets)
    jax.block_until_ready(m)
    times, peaks = [], []
    for _ in range(FLAGS.repeats):   # interleave: step, matmul, step, matmul, ...
      t = time.perf_counter()
      params, opt_state, m = compiled(params, opt_state, batch, budgets)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
      peaks.append(time_matmul(FLAGS.matmul_size))
    step_time, peak = float(np.median(times)), float(np.median(peaks))
    print(f"{str(bucket):>10} {n:>7} {1e3 * step_time:>9.1f} {flops / 1e9:>8.2f} "
          f"{flops / step_time / 1e9:>9.1f} {peak / 1e9:>15.1f}")
    total_flops += n * flops
    total_time += n * step_time
    peak_flops += n * peak
  peak = peak_flops / sum(visits.values())
  achieved = total_flops / total_time
  print(f"\nachieved {achieved / 1e9:.1f} GFLOP/s over a sampled run; matmul {peak / 1e9:.1f} GFLOP/s")
  print(f"MFU ratio (train step / matmul): {achieved / peak:.3f}")


if __name__ == "__main__":
  app.run(main)
