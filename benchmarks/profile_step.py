"""Where the embedded default's train step spends its time, by XLA fusion kind.

    python -m benchmarks.profile_step [--budget=256] [--steps=3] [--top=15]

Traces a few steps of one bucket's compiled train step with ``jax.profiler`` and sums
the device-op durations by fusion kind (the op name without its numeric suffix):
``ynn_fusion`` / ``dot`` are matrix multiplies, ``*copy*`` / ``transpose*`` are layout
copies, the rest elementwise work (masks, softmax, norms, activations). Op durations
overlap when XLA runs independent ops on several threads, so shares are of summed op
time, not of wall time. This is the profile behind the MFU row of benchmarks/RESULTS.md.
"""

import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp
from absl import app, flags
from ml_collections import config_flags


from benchmarks import common

config_flags.DEFINE_config_file("config", "configs/base.py", "Config to profile.")
flags.DEFINE_integer("budget", 256, "Visual-token budget (selects the bucket).")
flags.DEFINE_integer("steps", 3, "Traced steps.")
flags.DEFINE_integer("top", 15, "Fusion kinds to list.")
FLAGS = flags.FLAGS

_HOST_EVENT = re.compile(r"^\$|Execute|Pjit|Await|DevicePut|lower_sharding")


def fusion_kind(name: str) -> str:
  """'copy_bitcast_fusion.105' (or its 'end: ...' marker) -> 'copy_bitcast_fusion'."""
  return re.sub(r"[.\d]+$", "", name.removeprefix("end: "))


def op_times(trace_dir: str) -> collections.Counter:
  """Summed duration (us) of every device op in the newest trace under ``trace_dir``."""
  files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
  if not files:
    raise FileNotFoundError(f"no *.trace.json.gz written under {trace_dir}")
  with gzip.open(files[-1]) as f:
    events = json.load(f)["traceEvents"]
  times = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "dur" in e and not _HOST_EVENT.search(e["name"]):
      times[fusion_kind(e["name"])] += e["dur"]
  return times


def category(kind: str) -> str:
  if kind.startswith("ynn") or kind.startswith("dot") or "gemm" in kind:
    return "matmul"
  if "copy" in kind or "transpose" in kind:
    return "layout copy"
  return "elementwise / reduce"


def main(argv):
  del argv
  config = FLAGS.config
  setup = common.train_step_setup(config)
  spec, params, opt_state, batch, step = (setup.spec, setup.params, setup.opt_state,
                                          setup.batch, setup.step)
  budget = spec.budgets[-1] if FLAGS.budget not in spec.budgets else FLAGS.budget
  bucket, budgets = spec.bucket(budget), jnp.full((config.train.batch_size,), budget, jnp.int32)
  params, opt_state, metrics = step(params, opt_state, batch, budgets, bucket=bucket)
  jax.block_until_ready(metrics)  # compile outside the trace
  with tempfile.TemporaryDirectory() as trace_dir:
    start = time.perf_counter()
    jax.profiler.start_trace(trace_dir)
    for _ in range(FLAGS.steps):
      params, opt_state, metrics = step(params, opt_state, batch, budgets, bucket=bucket)
    jax.block_until_ready(metrics)
    jax.profiler.stop_trace()
    wall_ms = 1e3 * (time.perf_counter() - start) / FLAGS.steps
    times = op_times(trace_dir)
  total = sum(times.values())
  per_step = lambda us: us / 1e3 / FLAGS.steps
  print(f"budget {budget} ({bucket}), batch {config.train.batch_size}: {wall_ms:.0f} ms/step wall "
        f"(traced), {per_step(total):.0f} ms/step of summed op time")
  by_category = collections.Counter()
  for kind, us in times.items():
    by_category[category(kind)] += us
  for name, us in by_category.most_common():
    print(f"  {name:<22} {per_step(us):8.1f} ms  {100 * us / total:5.1f} %")
  print(f"top {FLAGS.top} fusion kinds:")
  for kind, us in times.most_common(FLAGS.top):
    print(f"  {kind:<30} {per_step(us):8.1f} ms  {100 * us / total:5.1f} %")


if __name__ == "__main__":
  app.run(main)
