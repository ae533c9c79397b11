r"""Train-step and prefill time vs the visual-token budget, next to the FLOP ratios.

    python -m benchmarks.budget_scaling [--budgets=16,64,256] [--repeats=5] [--config.train.batch_size=32 ...]

One process, the embedded default (``configs/base.py``: tiny CPU model, PARCEL connector),
randomly initialised. For every budget B it times

  train step  ``train_step_lib.make_train_step`` through a ``train_step_lib.CompiledSteps`` (one AOT program per
              bucket, exactly as ``parcel_jax.train`` runs it) on one batch of the Grain
              training pipeline, the whole batch at budget B (bucket ``spec.bucket(B)``);
  prefill     ``evaluation.encode_images`` + ``generation._prefill`` (connector -> projection ->
              ``decoder.prefill`` over ``[B visual tokens; text prefix]``) at the compact
              bucket, as ``evaluate`` / ``predict`` run it; the prefix has the cost model's
              N_t = 129 tokens (``flops.IMAGE_TEXT_TOKENS``) unless ``--prefix_len`` says otherwise.

Timings are medians over ``--repeats`` rounds; each round runs every (budget, program) once,
interleaved, so a load change on a shared machine hits all budgets alike. Everything is
compiled first (compile time excluded). Printed next to each time relative to the largest
budget: the FLOP ratio of ``parcel_jax.flops.cost`` (Appendix C; for the train step also the
same model at the step's text length) and of XLA's count of the compiled programs
(``flops.compiled_flops``).

Then the budget sampler: ``--draws`` steps of ``budgets.sample_step`` (the config's sampling
mode and distribution), one batch fed to a fresh ``CompiledSteps`` per newly drawn bucket;
prints the distinct budgets drawn next to ``CompiledSteps.num_compiled`` (one program per
bucket, however many budgets share it).
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from parcel_jax import config as config_lib  # noqa
from parcel_jax import state as state_lib  # noqa
from parcel_jax import train_step as train_step_lib  # noqa
from parcel_jax import budgets as budgets_lib
from parcel_jax import evaluation, generation, sharding
from parcel_jax import flops as flops_lib
from parcel_jax.data import pipeline

config_flags.DEFINE_config_file("config", "configs/base.py", "Config to measure.")
flags.DEFINE_list("budgets", ["16", "64", "256"], "Budgets to time; ratios are to the largest.")
flags.DEFINE_integer("repeats", 5, "Timed rounds (each runs every budget once).")
flags.DEFINE_integer("prefill_batch", 32, "Images per prefill call.")
flags.DEFINE_integer("prefix_len", flops_lib.IMAGE_TEXT_TOKENS, "Text prefix tokens of the prefill.")
flags.DEFINE_integer("draws", 300, "Sampler steps for the distinct-budgets vs programs count.")
FLAGS = flags.FLAGS


def model_flops_at(config, budget: int, text_len: int) -> int:
  """``flops.cost`` of one example with a ``text_len``-token text instead of the paper's N_t."""
  c = flops_lib.cost(config, budget)
  dec = config.model.decoder
  return (c["total"] - c["llm"] - c["head"] + flops_lib.llm_prefill_flops(budget + text_len, dec)
          + 2 * text_len * dec.width * dec.vocab_size)


def block(tree):
  return jax.block_until_ready(tree)


def main(argv):
  del argv
  config = FLAGS.config
  model_cfg, spec = config_lib.validate_config(config)  # fills decoder.vocab_size in place
  budgets = sorted({int(b) for b in FLAGS.budgets})
  for b in budgets:
    spec.route(b)  # ValueError naming the allowed budgets
  ref = budgets[-1]
  mesh = sharding.make_mesh(config.mesh.shape)
  config_lib.check_batch_divisible(config, mesh)
  bs = config.train.batch_size

  # ------------------------------------------------------------- state, data
  graphdef, tx, params, opt_state = state_lib.init_state(
      model_cfg, config.optim, config.train.num_steps, mesh, config.seed,
      rules=sharding.rules_from_config(config.mesh))
  step_fn = train_step_lib.make_train_step(graphdef, tx, accum_steps=config.optim.grad_accum_steps, mesh=mesh)
  state_shardings = (sharding.tree_shardings(params), sharding.tree_shardings(opt_state))
  local = next(iter(pipeline.build_train_dataset(config.data, seed=config.seed, global_batch_size=bs)))
  local.pop("family")
  batch_spec = sharding.batch_sharding(mesh)
  batch = {k: jax.make_array_from_process_local_data(batch_spec, v) for k, v in local.items()}
  budget_arr = lambda vec: jax.make_array_from_process_local_data(batch_spec, np.asarray(vec, np.int32))

  # --------------------------------------------- sampler: budgets vs programs
  steps = train_step_lib.CompiledSteps(step_fn, mesh, state_shardings=state_shardings)
  drawn, bucket_draws, compile_s = set(), {}, {}
  for step in range(FLAGS.draws):
    bucket, vec = budgets_lib.sample_step(spec, config.seed, step, bs, mode=config.budget.sampling,
                                          distribution=config.budget.distribution,
                                          ramp_steps=budgets_lib.ramp_steps(config))
    drawn.update(int(b) for b in vec)
    bucket_draws[bucket] = bucket_draws.get(bucket, 0) + 1
    if bucket_draws[bucket] == 1:  # a new bucket: feed it one batch (compiles its program)
      start = time.perf_counter()
      params, opt_state, m = steps(params, opt_state, batch, budget_arr(vec), bucket)
      block((params, opt_state, m))
      compile_s[bucket] = time.perf_counter() - start
  sampled_programs = steps.num_compiled

  # --------------------------------------------------------- timed programs
  prefix = jnp.asarray(np.random.RandomState(0).randint(
      0, config.model.decoder.vocab_size, (FLAGS.prefill_batch, FLAGS.prefix_len)), jnp.int32)
  images = jnp.asarray(np.resize(local["image"], (FLAGS.prefill_batch, *local["image"].shape[1:])))
  enc_flops = flops_lib.compiled_flops(
      evaluation.encode_images.lower(graphdef, params, images).compile())
  rows = {}
  for b in budgets:
    tb, cb = spec.bucket(b), spec.compact_bucket(b)
    vec = budget_arr(np.full((bs,), b))
    if tb not in steps.flops:  # not drawn by the sampler: compile it here
      params, opt_state, m = steps(params, opt_state, batch, vec, tb)
      block((params, opt_state, m))
    pre_budgets = jnp.full((FLAGS.prefill_batch,), b, jnp.int32)
    kw = dict(bucket=cb, cache_size=cb.num_slots + FLAGS.prefix_len)
    pre_flops = enc_flops + flops_lib.compiled_flops(
        generation._prefill.lower(graphdef, params, evaluation.encode_images(graphdef, params, images),
                               prefix, pre_budgets, **kw).compile())
    rows[b] = dict(train_bucket=tb, prefill_bucket=cb, vec=vec, pre_budgets=pre_budgets, kw=kw,
                   train_xla=steps.flops[tb], prefill_xla=pre_flops,
                   model=flops_lib.cost(config, b)["total"],
                   model_train=model_flops_at(config, b, config.data.max_text_len),
                   train_t=[], prefill_t=[])

  def prefill(r):
    features = evaluation.encode_images(graphdef, params, images)
    return block(generation._prefill(graphdef, params, features, prefix, r["pre_budgets"], **r["kw"]))

  for r in rows.values():  # warm up the prefill (compiles both jitted pieces for this bucket)
    prefill(r)
  for i in range(FLAGS.repeats):  # interleaved rounds; the budget order alternates
    for b in (budgets if i % 2 == 0 else budgets[::-1]):
      r = rows[b]
      start = time.perf_counter()
      params, opt_state, m = steps(params, opt_state, batch, r["vec"], r["train_bucket"])
      block((params, opt_state, m))
      r["train_t"].append(time.perf_counter() - start)
      start = time.perf_counter()
      prefill(r)
      r["prefill_t"].append(time.perf_counter() - start)

  # ------------------------------------------------------------------ report
  for r in rows.values():
    r["train"], r["prefill"] = statistics.median(r["train_t"]), statistics.median(r["prefill_t"])
  R = rows[ref]
  v, d = model_cfg.vision, model_cfg.decoder
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; method {spec.method}; "
        f"ViT {v.depth}x{v.width} on a {spec.grid_size}x{spec.grid_size} grid, decoder "
        f"{d.depth}x{d.width}, vocab {d.vocab_size}; train batch {bs} (text {config.data.max_text_len}), "
        f"prefill batch {FLAGS.prefill_batch} (prefix {FLAGS.prefix_len}); median of {FLAGS.repeats}")
  print(f"ratios are to B={ref}; model = flops.cost (Appendix C: train column at the step's text "
        f"length, prefill column at N_t={flops_lib.IMAGE_TEXT_TOKENS}); XLA = compiled_flops")
  print(f"{'B':>5} {'train bucket':>13} {'step ms':>9} {'time':>6} {'XLA':>6} {'model':>6}   "
        f"{'prefill bucket':>14} {'prefill ms':>10} {'time':>6} {'XLA':>6} {'model':>6}")
  for b, r in rows.items():
    print(f"{b:>5} {str(r['train_bucket']):>13} {1e3 * r['train']:>9.1f} {r['train'] / R['train']:>6.3f} "
          f"{r['train_xla'] / R['train_xla']:>6.3f} {r['model_train'] / R['model_train']:>6.3f}   "
          f"{str(r['prefill_bucket']):>14} {1e3 * r['prefill']:>10.1f} {r['prefill'] / R['prefill']:>6.3f} "
          f"{r['prefill_xla'] / R['prefill_xla']:>6.3f} {r['model'] / R['model']:>6.3f}")
  for b, r in rows.items():
    if b == ref:
      continue
    print(f"B={b} vs B={ref}: train step time ratio {r['train'] / R['train']:.3f} "
          f"(XLA FLOPs {r['train_xla'] / R['train_xla']:.3f}, model {r['model_train'] / R['model_train']:.3f}); "
          f"prefill time ratio {r['prefill'] / R['prefill']:.3f} "
          f"(XLA FLOPs {r['prefill_xla'] / R['prefill_xla']:.3f}, model {r['model'] / R['model']:.3f})")
  print(f"\nsampler ({config.budget.sampling}, {config.budget.distribution}), {FLAGS.draws} steps: "
        f"draws per bucket " + ", ".join(f"{b} {n}" for b, n in sorted(bucket_draws.items())))
  print("first call (compile + one step) per bucket: "
        + ", ".join(f"{b} {s:.1f}s" for b, s in sorted(compile_s.items())))
  print(f"distinct budgets drawn: {len(drawn)} (of {len(spec.budgets)} in the space); "
        f"compiled train-step programs: {sampled_programs} (buckets drawn {len(bucket_draws)}, "
        f"buckets in the space {len(spec.buckets)}); budgets per program "
        f"{len(drawn) / sampled_programs:.1f}")


if __name__ == "__main__":
  app.run(main)
