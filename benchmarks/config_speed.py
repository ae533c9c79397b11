"""Train-step time of config variants, side by side, as ratios to the first.

    python -m benchmarks.config_speed \
        --variant="model.vision.num_heads=4,model.connector.num_heads=4,model.decoder.width=128,model.decoder.mlp_dim=512,model.decoder.num_heads=4,model.decoder.num_kv_heads=2"

Variant 0 is ``--config`` as given; each ``--variant`` is a comma-separated list of
``dotted.field=value`` overrides on top of it. Every variant's jitted train step is
compiled for each budget's bucket, then timed in interleaved rounds (one step of every
variant and budget per round), so a shared, noisy machine slows all of them alike.
This is the measurement behind the default's head counts and ViT depth (README, "Status").
"""

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks import common
from parcel_jax import host_memory

config_flags.DEFINE_config_file("config", "configs/base.py", "Config of variant 0.")
flags.DEFINE_multi_string("variant", [], "Comma-separated dotted.field=value overrides; repeatable.")
flags.DEFINE_list("budgets", ["16", "64", "256"], "Budgets to time (one bucket each).")
flags.DEFINE_integer("repeats", 3, "Timed rounds.")
FLAGS = flags.FLAGS


def with_overrides(config, spec: str):
  """A copy of ``config`` with ``spec`` ('a.b=1,c.d=x') applied by absl's ``--config.a.b=1``
  parser, exactly as train's command line is; an unknown field raises, naming it."""
  argv = ["config_speed", *(f"--config.{item.strip()}" for item in spec.split(",") if item.strip())]
  flag_values = flags.FlagValues()
  try:
    # config_flags registers one override flag per --config.* argument it is shown here.
    config_flags.DEFINE_config_dict("config", config.copy_and_resolve_references(),
                                    flag_values=flag_values, lock_config=True, sys_argv=argv)
    flag_values(argv)
  except (AttributeError, KeyError, flags.Error) as e:  # absl names only the last path part
    raise ValueError(f"--variant {spec!r} does not apply to the config: {e!r}") from e
  return flag_values.config


def main(argv):
  del argv
  host_memory.configure(FLAGS.config.train.host_malloc)  # as train.py: before JAX's backend starts
  specs = [""] + list(FLAGS.variant)
  budgets = [int(b) for b in FLAGS.budgets]
  configs = [with_overrides(FLAGS.config, s) for s in specs]   # bad fields fail before compiling
  setups = [common.train_step_setup(c) for c in configs]
  batch_sizes = [c.train.batch_size for c in configs]   # a variant may change it

  def one_step(k: int, budget: int) -> float:
    s = setups[k]
    bucket = s.spec.bucket(budget)
    start = time.perf_counter()
    s.params, s.opt_state, _ = s.step(s.params, s.opt_state, s.batch,
                                      jnp.full((batch_sizes[k],), budget, jnp.int32), bucket=bucket)
    jax.block_until_ready(s.params)
    return time.perf_counter() - start

  for k in range(len(specs)):        # compile every (variant, bucket) program outside the timing
    for b in budgets:
      one_step(k, b)
  times = np.zeros((len(specs), len(budgets), FLAGS.repeats))
  for r in range(FLAGS.repeats):
    for k in range(len(specs)):
      for j, b in enumerate(budgets):
        times[k, j, r] = one_step(k, b)
  ms = 1e3 * np.median(times, axis=-1)

  print(f"train step, median of {FLAGS.repeats} interleaved rounds (ms):")
  for k, spec in enumerate(specs):
    cells = "  ".join(f"B={b}: {ms[k, j]:7.1f}" for j, b in enumerate(budgets))
    print(f"  variant {k} (batch {batch_sizes[k]}): {cells}   {spec or '(the config as given)'}")
  for k in range(1, len(specs)):
    ratios = ", ".join(f"B={b} {ms[k, j] / ms[0, j]:.2f}x" for j, b in enumerate(budgets))
    print(f"ratio variant {k} / variant 0: {ratios}")
    if batch_sizes[k] != batch_sizes[0]:   # what a fixed number of examples costs
      per_example = ", ".join(f"B={b} {ms[k, j] / batch_sizes[k] / (ms[0, j] / batch_sizes[0]):.2f}x"
                              for j, b in enumerate(budgets))
      print(f"  per example, variant {k} / variant 0: {per_example}")


if __name__ == "__main__":
  app.run(main)
