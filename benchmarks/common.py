"""Set-up shared by the train-step benchmarks (mfu.py, profile_step.py, config_speed.py)."""

import dataclasses
from typing import Any, Callable

import jax

from parcel_jax import config as config_lib
from parcel_jax import state as state_lib
from parcel_jax import train_step as train_step_lib
from parcel_jax import budgets as budgets_lib
from parcel_jax import sharding
from parcel_jax.data import pipeline


@dataclasses.dataclass
class StepSetup:
  spec: budgets_lib.BudgetSpec
  params: Any
  opt_state: Any
  batch: dict      # one training batch of the config's data, without the 'family' column
  step: Callable   # jitted (params, opt_state, batch, budgets, *, bucket) -> (params, opt_state, metrics)


def train_step_setup(config) -> StepSetup:
  """The config's model, optimizer state, one real batch and the jitted, state-donating
  train step, as train.py builds them (single process)."""
  model_cfg, spec = config_lib.validate_config(config)
  mesh = sharding.make_mesh(config.mesh.shape)
  graphdef, tx, params, opt_state = state_lib.init_state(model_cfg, config.optim, 100, mesh, config.seed)
  batch = next(iter(pipeline.build_train_dataset(config.data, seed=0,
                                                 global_batch_size=config.train.batch_size)))
  batch.pop("family")
  step = jax.jit(train_step_lib.make_train_step(graphdef, tx, accum_steps=config.optim.grad_accum_steps),
                 static_argnames="bucket", donate_argnums=(0, 1))
  return StepSetup(spec, params, opt_state, batch, step)
