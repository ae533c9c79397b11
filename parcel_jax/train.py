r"""Main training job: ``python -m parcel_jax.train --config=configs/base.py --workdir=DIR``.

Reads top to bottom: config -> mesh -> model and optimizer state (sharded) -> data
-> loop (sample a budget, step, log, checkpoint) -> final evaluation at every
requested budget. Restarting with the same ``--workdir`` resumes exactly.

Exit status: 0 finished; 3 preempted (SIGTERM) after a complete checkpoint at the
current step; 1 on an error (the last complete checkpoint is left intact).
"""

from __future__ import annotations

import functools
import json
import logging as std_logging
import os
import signal
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from parcel_jax import budgets as budgets_lib
from parcel_jax import checkpoint as ckpt_lib
from parcel_jax import evaluate as evaluate_lib
from parcel_jax import flops as flops_lib
from parcel_jax import host_memory
from parcel_jax import metrics as metrics_lib
from parcel_jax import optim, sharding
from parcel_jax.data import pipeline
from parcel_jax.models import vlm
from parcel_jax import weights

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

# --------------------------------------------------------------------------- config

def validate_config(config: ml_collections.ConfigDict) -> tuple[vlm.ModelConfig, budgets_lib.BudgetSpec]:
  """Checks the config before anything is compiled; errors name the field.

  Fills ``model.decoder.vocab_size`` from the data's tokenizer when it is 0.
  """
  v = config.model.vision
  if v.image_size % v.patch_size:
    raise ValueError(f"model.vision.image_size={v.image_size} is not divisible by "
                     f"model.vision.patch_size={v.patch_size}")
  if config.data.name not in pipeline.DATASETS:
    raise ValueError(f"data.name={config.data.name!r} is unknown; allowed: {', '.join(pipeline.DATASETS)}")
  weights.apply_checkpoint_dims(config)  # init.hf_checkpoint: model dims from its config.json
  vocab = pipeline.build_tokenizer(config.data).vocab_size
  with config.unlocked():
    if config.model.decoder.vocab_size == 0:
      config.model.decoder.vocab_size = vocab
  if config.model.decoder.vocab_size < vocab:
    raise ValueError(f"model.decoder.vocab_size={config.model.decoder.vocab_size} is smaller than "
                     f"the tokenizer's vocabulary ({vocab})")
  grid = v.image_size // v.patch_size
  spec = budgets_lib.BudgetSpec.from_config(config.model.connector, grid)
  for field, value, allowed in (("budget.sampling", config.budget.sampling, budgets_lib.SAMPLING_MODES),
                                ("budget.distribution", config.budget.distribution, budgets_lib.DISTRIBUTIONS),
                                ("train.on_nonfinite", config.train.on_nonfinite, ("skip", "stop")),
                                ("train.host_malloc", config.train.host_malloc, host_memory.MODES)):
    if value not in allowed:
      raise ValueError(f"{field}={value!r} is unknown; allowed: {', '.join(allowed)}")
  for field in ("train.batch_size", "train.num_steps", "train.log_every", "train.checkpoint_every",
                "eval.batch_size", "optim.grad_accum_steps"):
    section, name = field.split(".")
    if config[section][name] < 1:
      raise ValueError(f"{field} must be >= 1, got {config[section][name]}")
  ramp = budgets_lib.ramp_fraction(config)
  if not 0.0 <= ramp <= 1.0:
    raise ValueError(f"budget.ramp_fraction={ramp} must be in [0, 1] (a fraction of train.num_steps)")
  if config.train.batch_size % config.optim.grad_accum_steps:
    raise ValueError(f"train.batch_size={config.train.batch_size} is not divisible by "
                     f"optim.grad_accum_steps={config.optim.grad_accum_steps}")
  if config.eval.num_examples > config.data.eval_size:
    raise ValueError(f"eval.num_examples={config.eval.num_examples} exceeds data.eval_size={config.data.eval_size}")
  if not eval_budgets(config, spec):
    raise ValueError(f"eval.budgets={tuple(config.eval.budgets)} has no budget of method "
                     f"{spec.method!r} (allowed: {spec.budgets[0]}..{spec.budgets[-1]})")
  return vlm.model_config(_model_fields(config.model)), spec


def check_batch_divisible(config, mesh) -> None:
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.train.batch_size % shards:
    raise ValueError(f"train.batch_size={config.train.batch_size} is not divisible by the {shards} "
                     f"data shards of mesh.shape={tuple(config.mesh.shape)}")


def _model_fields(model_cfg):
  """Maps the config's 0 = off convention onto the modules' None."""
  m = ml_collections.ConfigDict(model_cfg.to_dict())
  for key in ("attn_softcap", "final_softcap", "sliding_window", "query_scale"):
    if not m.decoder.get(key):
      m.decoder[key] = None
  return m


def eval_budgets(config, spec: budgets_lib.BudgetSpec) -> tuple[int, ...]:
  """Requested eval budgets that the method supports (M3: only its own squares)."""
  return tuple(b for b in config.eval.budgets if b in spec.budgets)


# ---------------------------------------------------------------------- model state

def init_state(model_cfg: vlm.ModelConfig, optim_cfg, num_steps: int, mesh, seed: int,
               rules=None):
  """Graph definition, optimizer, and sharded params + optimizer state created on the mesh.

  ``rules``: logical -> mesh axis table (``sharding.rules_from_config``; None = defaults).
  """
  make = lambda: vlm.VLM(model_cfg, rngs=nnx.Rngs(seed))
  graphdef, abstract = nnx.split(nnx.eval_shape(make))
  tx = optim.make_optimizer(optim_cfg, nnx.to_pure_dict(abstract), num_steps)
  param_shardings = sharding.param_shardings(abstract, mesh, rules)
  params = jax.jit(lambda: nnx.to_pure_dict(nnx.state(make())), out_shardings=param_shardings)()
  opt_shardings = sharding.optimizer_shardings(jax.eval_shape(tx.init, params), params,
                                               param_shardings, mesh)
  opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  return graphdef, tx, params, opt_state


def check_same_model(saved: dict, config, directory: str) -> None:
  """A checkpoint only resumes into the model (and budget space) it was trained as."""
  current = config.model.to_dict()
  diffs = []

  def walk(a, b, path):
    for key in sorted(set(a) | set(b)):
      x, y = a.get(key), b.get(key)
      if isinstance(x, dict) and isinstance(y, dict):
        walk(x, y, f"{path}.{key}")
      elif key not in ("remat", "variant", "dtype") and x != y and not (
          isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)) and list(x) == list(y)):
        diffs.append(f"{path}.{key}: checkpoint {x!r}, config {y!r}")
  walk(saved.get("model", {}), current, "model")
  if diffs:
    raise ValueError(f"the checkpoint in {directory} is of another model; differing fields: "
                     + "; ".join(diffs) + ". Use a new --workdir or the checkpoint's config.")


def abstract_train_state(state: dict) -> dict:
  """ShapeDtypeStructs with shardings: the restore target for Orbax."""
  # Non-array leaves (the int step) are their own restore target.
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                      if isinstance(x, jax.Array) else x, state)


# ------------------------------------------------------------------------- the step

def token_loss(logits, targets, loss_mask):
  """Summed cross-entropy and token count over the suffix."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  mask = loss_mask.astype(jnp.float32)
  return jnp.sum(ce * mask), jnp.sum(mask)


def make_train_step(graphdef, tx, *, accum_steps: int, mesh=None):
  """The pure step: (params, opt_state, batch, budgets) -> (params, opt_state, metrics).

  Micro-batch i takes rows i, i + k, i + 2k, ... (k = ``accum_steps``): each device's
  contiguous block of the batch then splits into k micro-batches locally (no data
  movement); with ``mesh`` the micro-batches are constrained to stay batch-sharded.
  """

  def micro_loss(params, micro, budgets, bucket):
    model = nnx.merge(graphdef, params)
    logits = model(micro["image"], micro["text"], micro["text_mask"], micro["ar_mask"],
                   bucket=bucket, budgets=budgets)
    loss_sum, count = token_loss(logits, micro["targets"], micro["loss_mask"])
    em = evaluate_lib.exact_match(logits, micro["targets"], micro["loss_mask"])
    return loss_sum, (count, jnp.sum(em))

  def step(params, opt_state, batch, budgets, *, bucket):
    split = lambda x: sharding.constrain_batch(
        jnp.swapaxes(x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]), 0, 1), mesh, 1)
    micro_batches = jax.tree.map(split, (batch, budgets))
    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

    def accumulate(carry, micro):
      grads, loss_sum, count, em = carry
      (l, (c, e)), g = grad_fn(params, micro[0], micro[1], bucket)
      return (jax.tree.map(jnp.add, grads, g), loss_sum + l, count + c, em + e), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (grads, loss_sum, count, em), _ = jax.lax.scan(
        accumulate, (zeros, 0.0, 0.0, 0.0), micro_batches)
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    loss = loss_sum / count
    grad_norm = optax.tree.norm(grads)
    updates, new_opt_state = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    # A non-finite step leaves parameters and optimizer state untouched.
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    metrics = {"loss": loss, "grad_norm": grad_norm, "train_exact_match": em / budgets.shape[0],
               "nonfinite": 1.0 - finite.astype(jnp.float32)}
    return keep(new_params, params), keep(new_opt_state, opt_state), metrics

  return step


class CompiledSteps:
  """One compiled program per bucket (AOT), with XLA's FLOP count for MFU.

  ``state_shardings=(params, opt_state)`` shardings (trees) pin the step's inputs and
  outputs, so updated state keeps exactly the layout it came in with (batch and
  budgets: split over (data, fsdp); metrics: replicated).
  """

  def __init__(self, step_fn, mesh, state_shardings=None):
    self._shardings = {}
    if state_shardings is not None:
      batch, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
      self._shardings = dict(in_shardings=(*state_shardings, batch, batch),
                             out_shardings=(*state_shardings, rep))
    self._step_fn = step_fn
    self._compiled = {}
    self.flops = {}

  def __call__(self, params, opt_state, batch, budgets, bucket):
    if bucket not in self._compiled:
      # The bucket is bound before jit (jit takes no keyword arguments with in_shardings).
      jitted = jax.jit(functools.partial(self._step_fn, bucket=bucket), donate_argnums=(0, 1),
                       **self._shardings)
      compiled = jitted.lower(params, opt_state, batch, budgets).compile()
      self._compiled[bucket] = compiled
      self.flops[bucket] = flops_lib.compiled_flops(compiled)
    return self._compiled[bucket](params, opt_state, batch, budgets)

  @property
  def num_compiled(self) -> int:
    return len(self._compiled)


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
  """Runs (or resumes) training in ``workdir`` and returns the final eval result."""
  model_cfg, spec = validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding.make_mesh(config.mesh.shape)
  check_batch_divisible(config, mesh)
  writer = metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0)
  # One process: our SIGTERM flag. Several: JAX's preemption sync point (through
  # ckpt.manager.reached_preemption) so that every process stops at the same step.
  preemption = _Preemption(install=jax.process_count() == 1)

  # Model and optimizer.
  num_steps = config.train.num_steps
  graphdef, tx, params, opt_state = init_state(model_cfg, config.optim, num_steps, mesh, config.seed,
                                               rules=sharding.rules_from_config(config.mesh))
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
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints)
  state = {"params": params, "opt_state": opt_state, "step": 0}
  latest = ckpt.latest_step()
  if latest is not None:
    check_same_model(ckpt.saved_config(latest), config, ckpt.directory)
    state = ckpt.restore(latest, abstract_train_state(state), train_iter)
    logging.info("resumed from step %d in %s", latest, ckpt.directory)
  else:  # a fresh run: pretrained weights named by config.init (if any), on the same shardings
    state["params"] = weights.load_init_params(config, state["params"], model_cfg)
  params, opt_state, start = state["params"], state["opt_state"], int(state["step"])

  # Loop.
  steps = CompiledSteps(
      make_train_step(graphdef, tx, accum_steps=config.optim.grad_accum_steps, mesh=mesh), mesh,
      state_shardings=(sharding.tree_shardings(params), sharding.tree_shardings(opt_state)))
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
      rates = meter.update(done, examples_per_step=config.train.batch_size,
                           tokens_per_step=float(np.sum(budget_vec)) + text_tokens * jax.process_count(),
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
  budgets = eval_budgets(config, spec)
  result = evaluate_lib.evaluate(graphdef, params, config, spec, budgets, mesh)
  result["steps"] = num_steps
  result["parameters"] = counts
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "eval.json"), "w") as f:
      json.dump(result, f, indent=2)
    print(f"\nExact match on {result['num_examples']} eval examples (method {spec.method}):")
    print(evaluate_lib.format_table(result), flush=True)
  ckpt.close()
  writer.close()
  return result


def _quiet_library_logs() -> None:
  """Keeps INFO lines from our code only; libraries (Orbax, Grain) log warnings and up."""
  def keep(record):
    return record.levelno >= std_logging.WARNING or "site-packages" not in record.pathname
  logging.get_absl_handler().addFilter(keep)


def main(argv):
  del argv
  _quiet_library_logs()
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
