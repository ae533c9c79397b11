r"""Input pipeline vs train step throughput (examples/s) on the embedded default.

    python -m benchmarks.input_pipeline [--repeats=3] [--batches=32] [--config.data.num_threads=2 ...]

One process, the config's data, batch size and ``data.num_threads`` (default: synthetic
64 px visual QA, batch 32, 2 prefetch threads):

  pipeline    examples/s of ``pipeline.build_train_dataset`` (the Grain pipeline train.py
              iterates: shuffle, procedural generation, tokenization, batching, prefetch), as
              ``--batches`` consecutive ``next()`` calls. Before each timed run the prefetch
              buffer is drained (untimed), so buffered batches made while the train step ran
              do not count; after it, the refill of the buffer is waited out, so the pipeline's
              threads are idle while the train step is timed.
  train step  examples/s of the jitted train step through ``train_step_lib.CompiledSteps`` over the
              default's bucket mix: the sampler (``budgets.sample_step``, the config's mode and
              distribution) over ``--sample_steps`` steps gives how often each bucket runs; each
              bucket's median step time is weighted by that (as a sampled run spends its time).

Both are measured in interleaved rounds (pipeline, then one step of every bucket), medians of
``--repeats``; compile time is excluded. Prints the ratio pipeline / train step (target >= 5:
the pipeline must keep far ahead of the step so that training never waits on data).
"""

from __future__ import annotations

import statistics
import time

import jax
from absl import app, flags
from ml_collections import config_flags

from parcel_jax import config as config_lib  # noqa
from parcel_jax import state as state_lib  # noqa
from parcel_jax import train_step as train_step_lib  # noqa
from parcel_jax import budgets as budgets_lib
from parcel_jax import sharding
from parcel_jax.data import pipeline

config_flags.DEFINE_config_file("config", "configs/base.py", "Config to measure.")
flags.DEFINE_integer("repeats", 3, "Timed rounds.")
flags.DEFINE_integer("batches", 32, "Batches pulled per timed pipeline run.")
flags.DEFINE_integer("sample_steps", 2000, "Sampler steps that give the bucket mix.")
flags.DEFINE_integer("prefetch_buffer_size", 4, "Grain prefetch buffer (build_train_dataset's default).")
FLAGS = flags.FLAGS
TARGET = 5.0


def main(argv):
  del argv
  config = FLAGS.config
  model_cfg, spec = config_lib.validate_config(config)
  mesh = sharding.make_mesh(config.mesh.shape)
  config_lib.check_batch_divisible(config, mesh)
  bs, buffer = config.train.batch_size, FLAGS.prefetch_buffer_size

  # The pipeline, as train.py builds it.
  dataset = pipeline.build_train_dataset(
      config.data, seed=config.seed, global_batch_size=bs, num_threads=config.data.num_threads,
      prefetch_buffer_size=buffer)
  it = iter(dataset)

  # The train step, as train.py runs it.
  graphdef, tx, params, opt_state = state_lib.init_state(
      model_cfg, config.optim, config.train.num_steps, mesh, config.seed,
      rules=sharding.rules_from_config(config.mesh))
  steps = train_step_lib.CompiledSteps(
      train_step_lib.make_train_step(graphdef, tx, accum_steps=config.optim.grad_accum_steps, mesh=mesh), mesh,
      state_shardings=(sharding.tree_shardings(params), sharding.tree_shardings(opt_state)))
  local = next(it)
  local.pop("family")
  batch_spec = sharding.batch_sharding(mesh)
  batch = {k: jax.make_array_from_process_local_data(batch_spec, v) for k, v in local.items()}
  visits, vecs = {}, {}
  for step in range(FLAGS.sample_steps):
    bucket, vec = budgets_lib.sample_step(spec, config.seed, step, bs, mode=config.budget.sampling,
                                          distribution=config.budget.distribution,
                                          ramp_steps=budgets_lib.ramp_steps(config))
    visits[bucket] = visits.get(bucket, 0) + 1
    vecs.setdefault(bucket, jax.make_array_from_process_local_data(batch_spec, vec))
  buckets = sorted(visits)

  def run_step(bucket):
    nonlocal params, opt_state
    params, opt_state, m = steps(params, opt_state, batch, vecs[bucket], bucket)
    jax.block_until_ready((params, opt_state, m))

  compile_start = time.perf_counter()
  for bucket in buckets:  # compile every bucket's program
    run_step(bucket)
  compile_s = time.perf_counter() - compile_start

  def pipeline_run() -> float:
    if config.data.num_threads:
      for _ in range(buffer):  # drain what was prefetched meanwhile (untimed)
        next(it)
    start = time.perf_counter()
    for _ in range(FLAGS.batches):
      next(it)
    elapsed = time.perf_counter() - start
    if config.data.num_threads:  # let the refill finish before anything else is timed
      time.sleep(1.5 * buffer * elapsed / FLAGS.batches + 0.05)
    return elapsed

  pipeline_run()  # warm-up
  pipe_t, step_t = [], {b: [] for b in buckets}
  for i in range(FLAGS.repeats):
    pipe_t.append(pipeline_run())
    for bucket in (buckets if i % 2 == 0 else buckets[::-1]):
      start = time.perf_counter()
      run_step(bucket)
      step_t[bucket].append(time.perf_counter() - start)

  pipe_rate = FLAGS.batches * bs / statistics.median(pipe_t)
  med = {b: statistics.median(t) for b, t in step_t.items()}
  total = sum(visits.values())
  mean_step = sum(visits[b] * med[b] for b in buckets) / total
  step_rate = bs / mean_step
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; method {spec.method}; data "
        f"{config.data.name} {config.data.image_size} px, text {config.data.max_text_len}; batch {bs}; "
        f"num_threads {config.data.num_threads}, prefetch buffer {buffer}; median of {FLAGS.repeats}")
  print(f"train-step compile (all {len(buckets)} buckets, excluded): {compile_s:.1f}s")
  print(f"{'bucket':>10} {'share':>6} {'step ms':>9} {'examples/s':>11}")
  for b in buckets:
    print(f"{str(b):>10} {visits[b] / total:>6.3f} {1e3 * med[b]:>9.1f} {bs / med[b]:>11.1f}")
  print(f"pipeline   {pipe_rate:9.1f} examples/s ({FLAGS.batches} batches of {bs} per run, "
        f"{1e3 * statistics.median(pipe_t) / FLAGS.batches:.1f} ms/batch)")
  print(f"train step {step_rate:9.1f} examples/s (bucket mix of {FLAGS.sample_steps} sampled steps, "
        f"{1e3 * mean_step:.1f} ms/step)")
  ratio = pipe_rate / step_rate
  print(f"ratio (pipeline / train step): {ratio:.2f}x (target >= {TARGET:g}x: "
        f"{'met' if ratio >= TARGET else 'NOT met'})")
  if hasattr(it, "close"):
    it.close()


if __name__ == "__main__":
  app.run(main)
