"""Shared test helpers."""

import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_rel_close(actual, expected, tol=1e-5):
  """Relative error in the Frobenius norm: ||a - e|| <= tol * ||e||.

  Element-wise rtol is meaningless on near-zero entries of float32 activations
  computed with different shapes (XLA tiles the reductions differently)."""
  a = np.asarray(actual, np.float64)
  e = np.asarray(expected, np.float64)
  assert a.shape == e.shape, (a.shape, e.shape)
  err = np.linalg.norm(a - e)
  scale = max(np.linalg.norm(e), 1e-12)
  assert err <= tol * scale, f"relative error {err / scale:.3e} > {tol:.1e}"


# A model small enough to compile and train in seconds on 2 CPU cores.
TINY_OVERRIDES = {
    "model.vision.width": 32, "model.vision.depth": 1, "model.vision.mlp_dim": 64,
    "model.vision.num_heads": 2,
    "model.connector.num_heads": 2, "model.connector.mlp_dim": 64,
    "model.decoder.width": 32, "model.decoder.depth": 1, "model.decoder.mlp_dim": 64,
    "model.decoder.num_heads": 2, "model.decoder.num_kv_heads": 1, "model.decoder.head_dim": 16,
    "train.batch_size": 8, "train.log_every": 1, "train.checkpoint_every": 1000,
    "eval.batch_size": 32, "eval.num_examples": 32, "data.num_threads": 0,
}


def tiny_config(**overrides):
  """configs/base.py with TINY_OVERRIDES and ``overrides`` ('a.b.c' keys) applied."""
  from configs import base  # pylint: disable=g-import-not-at-top
  config = base.get_config()
  for key, value in {**TINY_OVERRIDES, **overrides}.items():
    section = config
    *path, leaf = key.split(".")
    for p in path:
      section = section[p]
    section[leaf] = value
  return config


def cli_overrides(**overrides) -> list[str]:
  """The same settings as command-line flags for ``python -m parcel_jax.train``."""
  def fmt(v):
    if isinstance(v, tuple):
      return ",".join(map(str, v)) + ("," if len(v) == 1 else "")
    return str(v)
  return [f"--config.{k}={fmt(v)}" for k, v in {**TINY_OVERRIDES, **overrides}.items()]


def run_on_8_devices(module: str, function: str, timeout: int = 900):
  """``module.function()`` in a subprocess with 8 simulated CPU devices (this pytest process
  keeps its single device); returns its JSON-serialisable result."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu",
         "XLA_FLAGS": (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()}
  code = (f"import json; from tests import {module} as t; "
          f"print('RESULT ' + json.dumps(t.{function}()))")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])
