"""Activations are split by the batch under FSDP: per-device temporaries fall with the degree.

The compile runs in a subprocess with 8 simulated CPU devices (this pytest process keeps one).
Nothing executes: the train step is lowered from abstract shapes and XLA's
``memory_analysis()`` is read, as ``parcel_jax.compile`` does for TPU slices.
"""

from __future__ import annotations

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from parcel_jax import sharding
from tests.util import run_on_8_devices


MESHES = {"one_device": (1, 1, 1), "fsdp8": (1, 8, 1), "data8": (8, 1, 1), "data2_fsdp4": (2, 4, 1)}
GLOBAL_BATCH = 64


def _temporaries_body() -> dict:
  """(subprocess) Per-device temp bytes of the real train step on each mesh, global batch 64."""
  from configs import base
  from parcel_jax import config as config_lib
  from parcel_jax import state as state_lib
  from parcel_jax import train_step as train_step_lib
  from parcel_jax.compile import _train_batch

  assert jax.device_count() == 8, jax.devices()
  out = {}
  for name, shape in MESHES.items():
    c = base.get_config("parcel")
    # Widths at which activations, not parameters, dominate the step's memory.
    c.model.vision.width, c.model.vision.mlp_dim, c.model.vision.num_heads = 128, 512, 4
    c.model.connector.num_heads, c.model.connector.mlp_dim = 4, 512
    c.model.decoder.update(dict(width=256, mlp_dim=1024, depth=2, num_heads=4, num_kv_heads=2,
                                head_dim=64, vocab_size=4096))
    c.data.max_text_len = 32
    c.train.batch_size = GLOBAL_BATCH
    c.mesh.shape = shape
    model_cfg, spec = config_lib.validate_config(c, check_data=False)
    devices = jax.devices()[:int(np.prod(shape))]
    mesh = sharding.make_mesh(shape, devices)
    rules = sharding.rules_from_config(c.mesh)
    graphdef, tx, params, opt_state = state_lib.abstract_state(model_cfg, c.optim, 10, mesh, rules)
    step = train_step_lib.make_train_step(graphdef, tx, accum_steps=1, mesh=mesh)
    budgets = jax.ShapeDtypeStruct((GLOBAL_BATCH,), jnp.int32, sharding=sharding.batch_sharding(mesh))
    bucket = max(spec.buckets, key=lambda b: b.num_slots)
    lowered = train_step_lib.lower_step(
        step, bucket, (params, opt_state, _train_batch(c, mesh), budgets), mesh,
        (sharding.tree_shardings(params), sharding.tree_shardings(opt_state)), rules)
    mem = lowered.compile().memory_analysis()
    out[name] = {"temp": int(mem.temp_size_in_bytes), "args": int(mem.argument_size_in_bytes)}
  return out


@pytest.fixture(scope="module")
def temporaries():
  return run_on_8_devices("test_activation_sharding", "_temporaries_body")


@pytest.mark.parametrize("name", ["fsdp8", "data8", "data2_fsdp4"])
def test_temporaries_fall_with_the_batch_degree(temporaries, name):
  one, sharded = temporaries["one_device"]["temp"], temporaries[name]["temp"]
  print(f"{name}: {sharded / 2**20:.1f} MiB temporaries per device vs {one / 2**20:.1f} MiB on one device "
        f"({sharded / one:.3f}x)")
  assert sharded <= 0.25 * one


def test_fsdp_shards_the_arguments(temporaries):
  # Parameters + Adam state over 8 devices: about 1/8 each (batch inputs are split too).
  ratio = temporaries["fsdp8"]["args"] / temporaries["one_device"]["args"]
  assert ratio <= 0.2, ratio


# ------------------------------------------------------------- the context

def test_constrain_is_a_no_op_outside_a_context():
  x = jnp.ones((4, 3, 2))
  jaxpr = jax.make_jaxpr(lambda x: sharding.constrain(x, sharding.BTD))(x)
  assert "sharding_constraint" not in str(jaxpr)


def test_constrain_inside_a_context_uses_the_rules():
  mesh = sharding.make_mesh((1, 1, 1))
  seen = []

  def f(x):
    y = sharding.constrain(x, ("activation_batch", "activation_length", "activation_vocab"))
    seen.append(str(jax.make_jaxpr(lambda x: sharding.constrain(x, sharding.BTD))(x)))
    return y
  with sharding.activation_sharding(mesh):
    jax.jit(f).lower(jnp.ones((4, 3, 2)))
  assert "sharding_constraint" in seen[0]
  pod = types.SimpleNamespace(shape={"data": 2, "fsdp": 4, "tensor": 2})
  names = ("activation_batch", "activation_length", "activation_vocab")
  assert sharding.logical_to_spec(names, (8, 3, 64), pod) == P(("data", "fsdp"), None, "tensor")
  # A batch the (data, fsdp) shards do not divide stays whole (a serving batch of 1).
  assert sharding.logical_to_spec(names, (1, 3, 64), pod) == P(None, None, "tensor")
  with pytest.raises(ValueError, match="3 axis names"):
    with sharding.activation_sharding(mesh):
      jax.jit(lambda x: sharding.constrain(x, sharding.BTD)).lower(jnp.ones((4, 3)))
