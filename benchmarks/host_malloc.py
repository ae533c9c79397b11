"""Train-step time with `train.host_malloc=reuse` vs glibc's defaults, side by side.

    python -m benchmarks.host_malloc [--budgets=16,64,256] [--steps=20] [--rounds=2]

The setting is process-wide and must precede JAX's backend, so each mode runs in its own
child process (this script re-invoked with --child=MODE); the parent alternates the modes
for --rounds rounds, so drift on a shared machine hits both alike, and prints each mode's
median step time, minor page faults and kernel time per step, and the ratio reuse / system.
"""

import resource
import subprocess
import sys
import time

import numpy as np
from absl import app, flags
from ml_collections import config_flags

config_flags.DEFINE_config_file("config", "configs/base.py", "Config whose train step is timed.")
flags.DEFINE_list("budgets", ["16", "64", "256"], "Budgets to time (one bucket each).")
flags.DEFINE_integer("steps", 20, "Timed steps per budget per round (after 3 warm-up steps).")
flags.DEFINE_integer("rounds", 2, "Child processes per mode, alternated.")
flags.DEFINE_string("child", "", "Internal: time the steps in this process with this mode.")
FLAGS = flags.FLAGS
MODES = ("system", "reuse")


def time_steps(config, mode: str) -> None:
  """Child: configure malloc, then print 'B ms_per_step faults_per_step sys_ms_per_step' lines."""
  from parcel_jax import host_memory
  if host_memory.configure(mode) != (mode == "reuse"):
    raise RuntimeError(f"host_malloc={mode} did not take effect in this process")
  import jax
  import jax.numpy as jnp
  from benchmarks import common
  s = common.train_step_setup(config)
  for budget in (int(b) for b in FLAGS.budgets):
    bucket = s.spec.bucket(budget)
    budgets = jnp.full((config.train.batch_size,), budget, jnp.int32)
    for i in range(3 + FLAGS.steps):
      if i == 3:
        jax.block_until_ready(s.params)
        usage, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
      s.params, s.opt_state, _ = s.step(s.params, s.opt_state, s.batch, budgets, bucket=bucket)
    jax.block_until_ready(s.params)
    seconds, end = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
    n = FLAGS.steps
    print(f"RESULT {budget} {1e3 * seconds / n:.2f} {(end.ru_minflt - usage.ru_minflt) / n:.0f} "
          f"{1e3 * (end.ru_stime - usage.ru_stime) / n:.2f}", flush=True)


def main(argv):
  del argv
  if FLAGS.child:
    return time_steps(FLAGS.config, FLAGS.child)
  results = {mode: [] for mode in MODES}   # mode -> [(budget, ms, faults, sys_ms)]
  for _ in range(FLAGS.rounds):
    for mode in MODES:
      out = subprocess.run([sys.executable, "-m", "benchmarks.host_malloc", f"--child={mode}",
                            *sys.argv[1:]], capture_output=True, text=True, check=False)
      if out.returncode:
        raise RuntimeError(f"child {mode} failed:\n{out.stderr[-3000:]}")
      results[mode] += [tuple(float(x) for x in line.split()[1:]) for line in out.stdout.splitlines()
                        if line.startswith("RESULT ")]
  print(f"train step, median over {FLAGS.rounds} processes per mode ({FLAGS.steps} steps each):")
  table = {}
  for mode in MODES:
    rows = np.array(results[mode])
    for budget in (int(b) for b in FLAGS.budgets):
      table[mode, budget] = np.median(rows[rows[:, 0] == budget, 1:], axis=0)
      ms, faults, sys_ms = table[mode, budget]
      print(f"  {mode:6s} B={budget}: {ms:7.1f} ms/step, {faults:8.0f} minor faults/step, "
            f"{sys_ms:6.1f} ms kernel/step")
  ratios = ", ".join(f"B={b} {table['reuse', int(b)][0] / table['system', int(b)][0]:.2f}x"
                     for b in FLAGS.budgets)
  print(f"ratio reuse / system step time: {ratios}")


if __name__ == "__main__":
  app.run(main)
