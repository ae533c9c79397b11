"""Progress and metrics: JSONL + TensorBoard writers, throughput, MFU, ETA."""

from __future__ import annotations

import json
import os
import time
import zlib

import numpy as np

import jax
import jax.numpy as jnp


def peak_flops(size: int = 1024, repeats: int = 5) -> float:
  """Achieved FLOP/s of a large jitted float32 matmul on this device: the MFU denominator."""
  a = jnp.ones((size, size), jnp.float32)
  mm = jax.jit(lambda x, y: x @ y)
  mm(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    mm(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t)
  return 2 * size ** 3 / best


def fingerprint(batch: dict) -> int:
  """CRC32 of a host batch: lets tests and people check that two runs saw the same data."""
  crc = 0
  for key in sorted(batch):
    crc = zlib.crc32(np.ascontiguousarray(batch[key]).tobytes(), crc)
  return crc


def format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Throughput:
  """Rates between consecutive ``update`` calls, and the ETA of the whole run."""

  def __init__(self, peak_flops: float, total_steps: int):
    self.peak, self.total = peak_flops, total_steps
    self.last_time, self.last_step = time.perf_counter(), None

  def update(self, step: int, *, examples_per_step: float, tokens_per_step: float,
             flops_per_step: float) -> dict:
    now = time.perf_counter()
    steps = step - self.last_step if self.last_step is not None else 0
    step_time = (now - self.last_time) / max(steps, 1)
    self.last_time, self.last_step = now, step
    if not steps:  # the first interval includes compilation: report no rate yet
      return {"examples_per_sec": 0.0, "tokens_per_sec": 0.0, "mfu": 0.0, "eta_sec": 0.0,
              "step_time_sec": 0.0}
    return {"examples_per_sec": examples_per_step / step_time,
            "tokens_per_sec": tokens_per_step / step_time, "step_time_sec": step_time,
            "mfu": flops_per_step / step_time / self.peak if self.peak else 0.0,
            "eta_sec": step_time * (self.total - step)}


class MetricWriter:
  """Writes scalars to ``workdir/metrics.jsonl`` and TensorBoard (process 0 only)."""

  def __init__(self, workdir: str, enabled: bool = True):
    self.enabled = enabled
    self._jsonl = self._tb = None
    if enabled:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, record: dict) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for k, v in record.items():
      if isinstance(v, (int, float)) and k != "step":
        self._tb.add_scalar(k, v, step)
    self._tb.flush()

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tb.close()
