"""Shared fixtures: one tiny trained checkpoint per test session (for the CLI tests)."""

import os
import subprocess
import sys

import pytest

from configs import base

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(method: str = "parcel", **connector):
  """A model small enough to train and compile in seconds on two CPU cores."""
  c = base.get_config(method)
  c.model.vision.width = 32
  c.model.vision.depth = 1
  c.model.vision.mlp_dim = 64
  c.model.decoder.width = 32
  c.model.decoder.depth = 1
  c.model.decoder.head_dim = 16
  c.model.decoder.mlp_dim = 64
  c.model.connector.mlp_dim = 64
  if method == "parcel":
    c.model.connector.budgets = (16, 24, 64, 100)  # with and without queries, few compiles
  for k, v in connector.items():
    c.model.connector[k] = v
  c.train.num_steps = 3
  c.budget.ramp_fraction = 0.0  # tests pick seeds for the budgets they draw; the ramp has its own tests
  c.train.batch_size = 8
  c.eval.num_examples = 64
  c.eval.batch_size = 32
  c.data.num_threads = 0
  return c


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
  """Workdir of a 3-step PARCEL run (checkpoint at step 3 and eval.json), trained in-process."""
  from parcel_jax import train

  workdir = str(tmp_path_factory.mktemp("tiny_parcel"))
  config = tiny_config()
  config.seed = 49  # its 3 steps all sample B = 24 (queries on): one compiled train step
  train.train_and_evaluate(config, workdir)
  return workdir


def run_cli(module: str, *args: str, timeout: int = 120) -> subprocess.CompletedProcess:
  """``python -m module args`` from the repo root; returns the completed process."""
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  return subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)
