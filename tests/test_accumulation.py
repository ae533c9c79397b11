"""Train-step equalities on one device: gradient accumulation, and scan + remat.

The helpers here (``tiny_config``, ``Stepper``, ``compare``) are shared with ``test_sharding.py``,
whose multi-device body runs in a subprocess.

Gradients are read out exactly through a capture "optimizer" whose new state *is*
the gradient tree, so the comparisons do not go through Adam (which would hide a
gradient scaled by any constant); the real AdamW step is compared separately.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import base
from parcel_jax import config as config_lib
from parcel_jax import state as state_lib
from parcel_jax import train_step as train_step_lib
from parcel_jax import budgets as budgets_lib
from parcel_jax import optim, sharding
from parcel_jax.data import pipeline
from parcel_jax.models import gemma, vit

TOL = 1e-5
UPDATE_TOL = 1e-3


def tiny_config(**overrides) -> ml_collections.ConfigDict:
  """The embedded default shrunk to seconds on CPU; dims divisible by 2 and 8 (mesh axes).

  Budgets 18 and 30 share one bucket, so per-example budgets differ inside a batch
  while only one program compiles.
  """
  c = base.get_config()
  settings = {
      "model.vision.image_size": 32, "model.vision.patch_size": 2, "model.vision.width": 32,
      "model.vision.depth": 1, "model.vision.mlp_dim": 64, "model.vision.num_heads": 2,
      "model.connector.num_heads": 2, "model.connector.mlp_dim": 64,
      "model.connector.budgets": (18, 30),
      "model.decoder.width": 32, "model.decoder.depth": 2, "model.decoder.mlp_dim": 64,
      "model.decoder.num_heads": 2, "model.decoder.num_kv_heads": 2, "model.decoder.head_dim": 16,
      "model.decoder.vocab_size": 64,
      "budget.sampling": "per_example",
      "data.num_threads": 0,
      "train.batch_size": 8, "train.num_steps": 10, "train.log_every": 1,
      "optim.warmup_steps": 0,  # a non-zero learning rate at step 0
      "eval.budgets": (18,), "eval.batch_size": 8, "eval.num_examples": 8,
  }
  settings.update(overrides)
  for key, value in settings.items():
    *path, name = key.split(".")
    node = c
    for p in path:
      node = node[p]
    node[name] = value
  return c


class CaptureState(NamedTuple):
  inner: Any
  grads: Any


def capturing(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """``tx`` that also returns the gradients it was given in its state (``.grads``)."""
  def init(params):
    return CaptureState(tx.init(params), jax.tree.map(jnp.zeros_like, params))

  def update(grads, state, params=None):
    updates, inner = tx.update(grads, state.inner, params)
    return updates, CaptureState(inner, grads)
  return optax.GradientTransformation(init, update)


def first_batch(config, step: int = 0):
  """Step ``step``'s global batch (numpy), bucket and per-example budgets."""
  _, spec = config_lib.validate_config(config)
  it = iter(pipeline.build_train_dataset(config.data, seed=config.seed,
                                         global_batch_size=config.train.batch_size))
  for _ in range(step + 1):
    batch = next(it)
  batch.pop("family")
  bucket, budget_vec = budgets_lib.sample_step(
      spec, config.seed, step, config.train.batch_size,
      mode=config.budget.sampling, distribution=config.budget.distribution)
  return batch, bucket, budget_vec


class Stepper:
  """The real train step of ``config`` on ``mesh``, compiled once, from fixed initial
  parameters; ``__call__(batch_data)`` returns numpy results for one step.

  ``params`` (numpy tree) replaces the initial parameters (for layout conversions).
  """

  def __init__(self, config, mesh, *, params=None):
    model_cfg, _ = config_lib.validate_config(config)
    graphdef, tx, init_params, _ = state_lib.init_state(
        model_cfg, config.optim, config.train.num_steps, mesh, config.seed,
        rules=sharding.rules_from_config(config.mesh))
    self.param_shardings = sharding.tree_shardings(init_params)
    self.before = (jax.tree.map(np.array, init_params) if params is None  # copies: buffers get donated
                   else jax.tree.map(np.asarray, params))
    self.tx = capturing(tx)
    opt_shapes = jax.eval_shape(self.tx.init, init_params)
    self.opt_shardings = sharding.optimizer_shardings(opt_shapes, init_params,
                                                      self.param_shardings, mesh)
    self.mesh, self.config = mesh, config
    self.step = train_step_lib.CompiledSteps(
        train_step_lib.make_train_step(graphdef, self.tx, accum_steps=config.optim.grad_accum_steps,
                                       mesh=mesh, loss_chunk=config_lib.loss_chunk(config)),
        mesh, state_shardings=(self.param_shardings, self.opt_shardings))

  def __call__(self, batch_data=None) -> dict:
    """dict(loss, grad_norm, grads, params_before, params_after, specs, shapes,
    shard_shapes): the last three map parameter paths to the PartitionSpec string, the
    global shape and one device's shard shape of the updated parameters."""
    batch, bucket, budget_vec = batch_data or first_batch(self.config)
    spec = sharding.batch_sharding(self.mesh)
    params = jax.tree.map(jax.device_put, self.before, self.param_shardings)
    opt_state = jax.jit(self.tx.init, out_shardings=self.opt_shardings)(params)
    new_params, new_state, metrics = self.step(
        params, opt_state, {k: jax.device_put(v, spec) for k, v in batch.items()},
        jax.device_put(budget_vec, spec), bucket)
    # The state keeps its layout through the step (explicit out_shardings).
    for a, s in zip(jax.tree.leaves(new_params), jax.tree.leaves(self.param_shardings)):
      assert a.sharding == s, (a.sharding, s)
    return {"loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
            "grads": jax.tree.map(np.asarray, new_state.grads), "params_before": self.before,
            "params_after": jax.tree.map(np.asarray, new_params),
            "specs": {optim.path_str(path): str(x.sharding.spec)
                      for path, x in jax.tree_util.tree_leaves_with_path(new_params)},
            "shapes": {optim.path_str(path): list(x.shape)
                       for path, x in jax.tree_util.tree_leaves_with_path(new_params)},
            "shard_shapes": {optim.path_str(path): list(x.addressable_shards[0].data.shape)
                             for path, x in jax.tree_util.tree_leaves_with_path(new_params)}}


def _norm(x) -> float:
  return float(np.linalg.norm(np.asarray(x, np.float64)))


def _tree_norm(tree) -> float:
  return float(np.sqrt(sum(_norm(x) ** 2 for x in jax.tree.leaves(tree))))


def _diff(a, b):
  return jax.tree.map(lambda x, y: np.asarray(x, np.float64) - np.asarray(y, np.float64), a, b)


def compare(result, reference) -> dict:
  """Relative errors of one step against a reference step.

  loss, grad_norm: scalars. grads: the largest per-leaf ||a - e|| / max(||e||, 1e-3 G)
  (G = the global gradient norm; the floor covers leaves whose exact gradient is 0,
  such as attention key biases, where float noise is all there is). params: whole
  tree, ||a - e|| / ||e||. updates: the largest per-leaf relative error of
  (params_after - params_before) over leaves with a real gradient (> 1e-6 G); looser
  (``UPDATE_TOL``) because Adam's first step is g / (|g| + eps) element-wise, which
  turns float noise on gradient entries near eps (1e-8) into visible step changes
  (zero-gradient leaves, e.g. attention key biases, are left to the gradient check).
  """
  ref_grads = reference["grads"]
  g = _tree_norm(ref_grads)
  grad_errs = [_norm(np.float64(a) - np.float64(e)) / max(_norm(e), 1e-3 * g)
               for a, e in zip(jax.tree.leaves(result["grads"]), jax.tree.leaves(ref_grads))]
  live = [_norm(e) > 1e-6 * g for e in jax.tree.leaves(ref_grads)]
  upd = lambda r: jax.tree.leaves(_diff(r["params_after"], r["params_before"]))
  upd_errs = [_norm(a - e) / max(_norm(e), 1e-30)
              for a, e, keep in zip(upd(result), upd(reference), live) if keep]
  return {
      "loss": abs(result["loss"] - reference["loss"]) / abs(reference["loss"]),
      "grad_norm": abs(result["grad_norm"] - reference["grad_norm"]) / reference["grad_norm"],
      "grads": max(grad_errs),
      "params": _tree_norm(_diff(result["params_after"], reference["params_after"]))
                / _tree_norm(reference["params_after"]),
      "updates": max(upd_errs),
  }


def assert_step_close(errors: dict) -> None:
  strict = {k: v for k, v in errors.items() if k != "updates"}
  assert max(strict.values()) <= TOL, errors
  assert errors["updates"] <= UPDATE_TOL, errors


def single_device_mesh():
  return sharding.make_mesh((1, 1, 1), devices=jax.devices()[:1])


# ----------------------------------------------------------------------- tests
# Four compiled steps in all: the reference, accumulation, the chunked loss, and scan + remat.

@pytest.fixture(scope="module")
def reference():
  config = tiny_config()
  data = first_batch(config)
  stepper = Stepper(config, single_device_mesh())
  return stepper, data, stepper(data)


def test_accumulation_equals_one_big_batch(reference):
  """4 micro-batches of 2 == one batch of 8: loss, gradients and the AdamW step; and
  the comparison is not vacuous (another batch is far off)."""
  ref_stepper, data, ref = reference
  assert len(set(data[2].tolist())) > 1  # per-example budgets really differ in the batch
  accumulated = Stepper(tiny_config(**{"optim.grad_accum_steps": 4}), single_device_mesh())(data)
  errors = compare(accumulated, ref)
  print("grad_accum_steps=4 vs 1:", {k: f"{v:.1e}" for k, v in errors.items()})
  assert_step_close(errors)
  other = compare(ref_stepper(first_batch(ref_stepper.config, 1)), ref)
  assert other["grads"] > 1e-2 and other["loss"] > 1e-4, other


def test_chunked_loss_step_equals_full_logits_step(reference):
  """train.loss_chunk=5 (16 text positions in 4 chunks, the last one padded) == the step
  that computes all logits at once: loss, gradients and the AdamW step."""
  _, data, ref = reference
  chunked = Stepper(tiny_config(**{"train.loss_chunk": 5}), single_device_mesh())(data)
  errors = compare(chunked, ref)
  print("loss_chunk=5 vs full logits:", {k: f"{v:.1e}" for k, v in errors.items()})
  assert_step_close(errors)


def test_scan_and_remat_match_unrolled_step(reference):
  """decoder.scan=True + remat='full' (and the same for the ViT) == the plain step."""
  _, data, plain = reference
  scan_cfg = tiny_config(**{"model.decoder.scan": True, "model.decoder.remat": "full",
                            "model.vision.scan": True, "model.vision.remat": "full"})
  model_cfg, _ = config_lib.validate_config(scan_cfg)

  def convert(p, to):
    p = dict(p)
    p["decoder"] = (gemma.to_scanned if to else gemma.from_scanned)(p["decoder"], model_cfg.decoder)
    p["vision"] = (vit.to_scanned if to else vit.from_scanned)(p["vision"], model_cfg.vision)
    return p

  scanned = Stepper(scan_cfg, single_device_mesh(),
                    params=convert(plain["params_before"], to=True))(data)
  for key in ("grads", "params_before", "params_after"):
    scanned[key] = convert(scanned[key], to=False)
  errors = compare(scanned, plain)
  print("scan+remat vs plain:", {k: f"{v:.1e}" for k, v in errors.items()})
  assert_step_close(errors)
