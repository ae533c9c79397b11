r"""Main training job: ``python -m parcel_jax.train --config=configs/base.py --workdir=DIR``.

Reads top to bottom: config -> mesh -> model and optimizer state (sharded) -> data
-> loop (sample a budget, step, log, checkpoint) -> final evaluation at every
requested budget. Restarting with the same ``--workdir`` resumes exactly.

Exit status: 0 finished; 3 preempted (SIGTERM) after a complete checkpoint at the
current step; 1 on an error (the last complete checkpoint is left intact).
"""

from __future__ import annotations

import json
import signal
import sys

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from parcel_jax import budgets as budgets_lib
from parcel_jax import checkpoint as ckpt_lib
from parcel_jax import cli
from parcel_jax import config as config_lib
from parcel_jax import evaluation
from parcel_jax import host_memory
from parcel_jax import metrics as metrics_lib
from parcel_jax import paths
from parcel_jax import sharding
from parcel_jax import stages
from parcel_jax import state as state_lib
from parcel_jax import train_step as train_step_lib
from parcel_jax import weights
from parcel_jax.data import pipeline
from parcel_jax.models import vlm

PREEMPTED_EXIT_CODE = 3

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Only when run as a script, so that importing this module (tools, benchmarks, tests)
  registers no command-line flags."""
  config_flags.DEFINE_config_file("config", None, "Path to a config file (configs/base.py).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and eval results.")
  # Multi-process (multi-host) training; see sharding.initialize_distributed.
  flags.DEFINE_string("coordinator_address", None, "host:port of process 0's coordinator service.")
  flags.DEFINE_integer("num_processes", None, "Number of JAX processes in the job.")
  flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
  flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with cluster "
                    "auto-detection (Cloud TPU pod, SLURM, Open MPI) for values not given above.")

# ---------------------------------------------------------------------------- main

class _Preemption:
  """SIGTERM sets a flag; the loop checkpoints at the next step boundary and exits."""

  def __init__(self, install: bool = True):
    self.requested = False
    if install:
      signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) training in ``workdir`` and returns the final eval result.

  With ``train.stage1_steps`` (parcel_jax/stages.py) it first runs (or resumes, or finds
  finished) stage 1 in ``workdir/stage1``, then stage 2 from it in ``workdir``."""
  stages.validate(config)
  model_cfg, spec = config_lib.validate_config(config)  # also fills preset sizes in place
  if stages.stage1_steps(config):
    stage1_dir = paths.join(workdir, stages.STAGE1_SUBDIR)
    if stages.finished(stage1_dir, stages.stage1_steps(config)):
      logging.info("stage 1 in %s is complete", stage1_dir)
    else:
      logging.info("stage 1 (method none, %d steps) in %s", stages.stage1_steps(config), stage1_dir)
      train_and_evaluate(stages.stage1_config(config), stage1_dir)
    config = stages.stage2_config(config, stage1_dir)
    model_cfg, spec = config_lib.validate_config(config)
  paths.makedirs(workdir, flag="--workdir")  # first touch: a clear error for a missing gcsfs / s3fs
  mesh = sharding.make_mesh(config.mesh.shape)
  config_lib.check_batch_divisible(config, mesh)
  rules = sharding.rules_from_config(config.mesh)
  writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
  # One process: our SIGTERM flag. Several: JAX's preemption sync point (through
  # ckpt.manager.reached_preemption) so that every process stops at the same step.
  preemption = _Preemption(install=jax.process_count() == 1)

  # Model and optimizer.
  num_steps = config.train.num_steps
  graphdef, tx, params, opt_state = state_lib.init_state(model_cfg, config.optim, num_steps, mesh,
                                                         config.seed, rules=rules)
  counts = vlm.parameter_counts(nnx.merge(graphdef, params))
  logging.info("parameters: %s", {k: f"{v:,}" for k, v in counts.items()})
  logging.info("budgets: %s, buckets: %s", budgets_lib._describe(spec.budgets),
               ", ".join(map(str, spec.buckets)))

  # Data.
  train_ds = pipeline.build_train_dataset(
      config.data, seed=config.seed, global_batch_size=config.train.batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_threads=config.data.num_threads)
  train_iter = iter(train_ds)

  # Resume.
  ckpt = ckpt_lib.Checkpointer(paths.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints,
                              flag="--workdir")
  state = {"params": params, "opt_state": opt_state, "step": 0}
  latest = ckpt.latest_step()
  if latest is not None:
    state_lib.check_same_model(ckpt.saved_config(latest), config, ckpt.directory)
    state = ckpt.restore(latest, state_lib.abstract_train_state(state), train_iter)
    logging.info("resumed from step %d in %s", latest, ckpt.directory)
  elif stages.stage1_workdir(config):  # a fresh stage 2: the backbone of stage 1
    state["params"] = stages.load_backbone(config, state["params"], mesh, rules)
  else:  # a fresh run: pretrained weights named by config.init (if any), on the same shardings
    state["params"] = weights.load_init_params(config, state["params"], model_cfg)
  params, opt_state, start = state["params"], state["opt_state"], int(state["step"])

  # Loop.
  steps = train_step_lib.CompiledSteps(
      train_step_lib.make_train_step(graphdef, tx, accum_steps=config.optim.grad_accum_steps, mesh=mesh,
                                     loss_chunk=config_lib.loss_chunk(config)),
      mesh, state_shardings=(sharding.tree_shardings(params), sharding.tree_shardings(opt_state)),
      rules=rules)
  batch_spec = sharding.batch_sharding(mesh)
  meter = metrics_lib.Throughput(peak_flops=metrics_lib.peak_flops(), total_steps=num_steps)
  nonfinite_steps, pending_nonfinite = 0, []
  last = min(num_steps, config.train.stop_at or num_steps)
  ramp = budgets_lib.ramp_steps(config)
  for step in range(start, last):
    bucket, budget_vec = budgets_lib.sample_step(
        spec, config.seed, step, config.train.batch_size,
        mode=config.budget.sampling, distribution=config.budget.distribution,
        ramp_steps=ramp)
    local = next(train_iter)
    local.pop("family")  # evaluation-only field
    batch = {k: jax.make_array_from_process_local_data(batch_spec, v) for k, v in local.items()}
    # This process holds rows process_index, process_index + process_count, ... of the
    # global batch (pipeline.build_train_dataset slices after the shuffle): same budgets.
    budget_arr = jax.make_array_from_process_local_data(
        batch_spec, budget_vec.reshape(-1, jax.process_count())[:, jax.process_index()])
    params, opt_state, m = steps(params, opt_state, batch, budget_arr, bucket)

    done = step + 1
    logged = done % config.train.log_every == 0 or done == last
    if logged:
      m = jax.device_get(m)
      text_tokens = float(np.sum(local["text_mask"]))
      # all_scales: every scale's visual tokens went through the decoder.
      visual = (sum(b for _, b in bucket) * len(budget_vec) if isinstance(bucket, tuple)
                else float(np.sum(budget_vec)))
      rates = meter.update(done, examples_per_step=config.train.batch_size,
                           tokens_per_step=visual + text_tokens * jax.process_count(),
                           flops_per_step=steps.flops[bucket])
      record = {"step": done, "budget": int(budget_vec[0]), "bucket": str(bucket),
                "data_fingerprint": metrics_lib.fingerprint(local),
                **{k: float(v) for k, v in m.items()}, **rates, "compiled_programs": steps.num_compiled,
                "nonfinite_steps": nonfinite_steps + int(sum(float(x) for x in pending_nonfinite)),
                **pipeline.data_metrics(train_ds)}  # real data: bad examples skipped per kind
      writer.write(done, record)
      logging.info("step %d/%d loss %.4f budget %d em %.2f | %.1f ex/s %.0f tok/s MFU %.1f%% ETA %s",
                   done, num_steps, record["loss"], record["budget"], record["train_exact_match"],
                   rates["examples_per_sec"], rates["tokens_per_sec"], 100 * rates["mfu"],
                   metrics_lib.format_eta(rates["eta_sec"]))
    # Reading the flag syncs with the device, so 'skip' only reads it at log steps.
    pending_nonfinite.append(m["nonfinite"])
    if config.train.on_nonfinite == "stop" or logged:
      bad = int(sum(float(x) for x in pending_nonfinite))
      pending_nonfinite.clear()
      if bad:
        nonfinite_steps += bad
        logging.warning("non-finite loss or gradient: %d update(s) skipped by step %d (%d in all)",
                        bad, done, nonfinite_steps)
      if bad and config.train.on_nonfinite == "stop":
        ckpt.close()
        raise FloatingPointError(f"non-finite loss or gradient at step {done}; parameters were not "
                                 f"updated and the last complete checkpoint in {ckpt.directory} is intact")
    preempted = preemption.requested or ckpt.manager.reached_preemption(done)
    if done % config.train.checkpoint_every == 0 or done == last or preempted:
      ckpt.save(done, {"params": params, "opt_state": opt_state, "step": done}, train_iter, config)
    if preempted:
      ckpt.close()
      logging.warning("SIGTERM: checkpoint at step %d committed; exiting with status %d",
                      done, PREEMPTED_EXIT_CODE)
      sys.exit(PREEMPTED_EXIT_CODE)
  ckpt.wait()
  if last < num_steps:
    logging.info("stopped at step %d of %d (train.stop_at); rerun to continue", last, num_steps)
    ckpt.close()
    writer.close()
    return {"stopped_at": last}

  # Final evaluation at every requested budget.
  budgets = config_lib.eval_budgets(config, spec)
  result = evaluation.evaluate(graphdef, params, config, spec, budgets, mesh)
  result["steps"] = num_steps
  result["parameters"] = counts
  if jax.process_index() == 0:
    paths.write_text(paths.join(workdir, "eval.json"), json.dumps(result, indent=2))
    print(f"\nExact match on {result['num_examples']} eval examples (method {spec.method}):")
    print(evaluation.format_table(result), flush=True)
  ckpt.close()
  writer.close()
  return result


def main(argv):
  del argv
  cli.quiet_library_logs()
  if FLAGS.workdir is None:
    raise app.UsageError("--workdir is required")
  try:  # first: it only takes effect before JAX's backend threads exist
    host_memory.configure(FLAGS.config.train.host_malloc)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  if FLAGS.config.train.compilation_cache_dir:
    jax.config.update("jax_compilation_cache_dir", FLAGS.config.train.compilation_cache_dir)
  try:
    distributed = sharding.initialize_distributed(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id, auto=FLAGS.distributed)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  clean = False
  try:
    train_and_evaluate(FLAGS.config, FLAGS.workdir)
    clean = True
  except SystemExit as e:  # preemption: exits PREEMPTED_EXIT_CODE after a complete checkpoint
    clean = e.code in (None, 0, PREEMPTED_EXIT_CODE)
    raise
  finally:
    # After an error, skip the shutdown barrier (the other processes may never reach it).
    if distributed and clean:
      jax.distributed.shutdown()


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config"])
  app.run(main)
