"""The train step: a pure function of (params, opt_state, batch, budgets), and its programs.

``make_train_step`` is what ``parcel_jax.train`` runs and what ``parcel_jax.compile``
lowers for a TPU topology, so the compile-only numbers are those of the real step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from parcel_jax import flops as flops_lib
from parcel_jax import losses, sharding


def make_train_step(graphdef, tx, *, accum_steps: int, mesh=None, loss_chunk: int = 0):
  """The pure step: (params, opt_state, batch, budgets) -> (params, opt_state, metrics).

  ``loss_chunk`` > 0 computes the loss from the hidden states that many text positions at a
  time (``losses.chunked_token_loss``: the full-vocabulary logits are never materialised);
  0 computes the (b, L, vocab) logits at once. Both give the same loss and gradients.

  ``bucket`` (static) is one ``budgets.Bucket``, or a tuple of (bucket, budget) pairs: the loss
  is then the mean over those scales, each with its budget for the whole batch (M3's original
  objective, ``budget.sampling='all_scales'``); ``budgets`` only gives the batch shape.

  Micro-batch i takes rows i, i + k, i + 2k, ... (k = ``accum_steps``): each device's
  contiguous block of the batch then splits into k micro-batches locally (no data
  movement); with ``mesh`` the micro-batches are constrained to stay batch-sharded.
  """

  def micro_loss(params, micro, budgets, bucket):
    if isinstance(bucket, tuple):  # every scale at once: the mean of the scales' losses
      parts = [scale_loss(params, micro, jnp.full_like(budgets, budget), scale_bucket)
               for scale_bucket, budget in bucket]
      n = len(parts)
      return (sum(p[0] for p in parts) / n,
              (parts[0][1][0], sum(p[1][1] for p in parts) / n))
    return scale_loss(params, micro, budgets, bucket)

  def scale_loss(params, micro, budgets, bucket):
    model = nnx.merge(graphdef, params)
    if loss_chunk:
      hidden = model.text_hidden(model.encode_images(micro["image"], bucket), micro["text"],
                                 micro["text_mask"], micro["ar_mask"], bucket=bucket, budgets=budgets,
                                 has_image=micro.get("has_image"), frame_mask=micro.get("frame_mask"))
      loss_sum, count, em = losses.chunked_token_loss(
          hidden, micro["targets"], micro["loss_mask"], model.decoder.logits_fn(), loss_chunk)
      return loss_sum, (count, jnp.sum(em))
    logits = model(micro["image"], micro["text"], micro["text_mask"], micro["ar_mask"],
                   bucket=bucket, budgets=budgets, has_image=micro.get("has_image"),
                   frame_mask=micro.get("frame_mask"))
    loss_sum, count = losses.token_loss(logits, micro["targets"], micro["loss_mask"])
    em = losses.exact_match(logits, micro["targets"], micro["loss_mask"])
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


def jit_step(step_fn, bucket, mesh=None, state_shardings=None):
  """``jax.jit`` of ``step_fn`` for one bucket, donating the state. ``state_shardings=(params,
  opt_state)`` shardings pin inputs and outputs (batch and budgets split over (data, fsdp),
  metrics replicated), so updated state keeps exactly the layout it came in with."""
  kwargs = {}
  if state_shardings is not None:
    batch, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
    kwargs = dict(in_shardings=(*state_shardings, batch, batch),
                  out_shardings=(*state_shardings, rep))
  # The bucket is bound before jit (jit takes no keyword arguments with in_shardings).
  return jax.jit(functools.partial(step_fn, bucket=bucket), donate_argnums=(0, 1), **kwargs)


def lower_step(step_fn, bucket, args, mesh=None, state_shardings=None, rules=None):
  """Lowers the step for ``bucket`` on ``args`` (arrays or ShapeDtypeStructs); with a mesh,
  activations are constrained by the logical ``rules`` while tracing."""
  jitted = jit_step(step_fn, bucket, mesh, state_shardings)
  if mesh is None:
    return jitted.lower(*args)
  with sharding.activation_sharding(mesh, rules):
    return jitted.lower(*args)


class CompiledSteps:
  """One compiled program per bucket (AOT), with XLA's FLOP count for MFU.

  ``state_shardings=(params, opt_state)`` shardings pin the step's inputs and outputs;
  ``rules`` (logical -> mesh axes) place the activations when ``mesh`` is given.
  """

  def __init__(self, step_fn, mesh, state_shardings=None, rules=None):
    self._step_fn, self._mesh, self._rules = step_fn, mesh, rules
    self._state_shardings = state_shardings
    self._compiled = {}
    self.flops = {}

  def __call__(self, params, opt_state, batch, budgets, bucket):
    if bucket not in self._compiled:
      compiled = lower_step(self._step_fn, bucket, (params, opt_state, batch, budgets),
                            self._mesh, self._state_shardings, self._rules).compile()
      self._compiled[bucket] = compiled
      self.flops[bucket] = flops_lib.compiled_flops(compiled)
    return self._compiled[bucket](params, opt_state, batch, budgets)

  @property
  def num_compiled(self) -> int:
    return len(self._compiled)
