"""Progress and metrics: JSONL + TensorBoard writers, throughput, MFU, ETA."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
import time
import uuid
import zlib

import numpy as np

import jax
import jax.numpy as jnp
from absl import logging

from parcel_jax import paths


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
  """Writes scalars to ``workdir/metrics.jsonl`` and TensorBoard events to
  ``workdir/tensorboard`` (process 0 only; ``enabled=False`` elsewhere).

  A local workdir: appends to metrics.jsonl and flushes after every record, so the file
  can be read while the run goes; tensorboardX writes its events file in place.

  A cloud workdir (gs://, s3://, any scheme ``paths`` accepts): object stores have no
  append, and tensorboardX reaches gs:// / s3:// only through its own clients
  (google-cloud-storage, boto3; other schemes not at all). So both are written to a local
  staging directory, metrics.jsonl seeded with the workdir's existing file (a resumed run
  keeps its history), and copied to the workdir through etils.epath (whole files) at the
  first record, then at most every ``sync_every_sec`` seconds, at ``close()`` and at
  interpreter exit (a SIGTERM exit included). A crash can lose the records of the last
  ``sync_every_sec`` seconds from the workdir's copy; checkpoints are not affected.
  """

  def __init__(self, workdir: str, enabled: bool = True, *, sync_every_sec: float = 30.0,
               flag: str = "--workdir"):
    self.enabled = enabled
    self._jsonl = self._tb = None
    self._remote = None  # the cloud workdir, when staging
    self._stage = None
    if not enabled:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    workdir = paths.normalize(workdir, flag)
    if not paths.is_uri(workdir):
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      return
    self._remote, self._sync_every = workdir, sync_every_sec
    self._stage = tempfile.mkdtemp(prefix="parcel_metrics_")
    staged = os.path.join(self._stage, "metrics.jsonl")
    remote = paths.join(workdir, "metrics.jsonl")
    with paths.filesystem_errors(workdir, flag):
      if paths.exists(remote):
        paths.copy_file(remote, staged)
    self._jsonl = open(staged, "a")
    # A unique events file name: the copy must never replace an earlier run's file (the
    # default name only has the second and the host).
    self._tb = SummaryWriter(os.path.join(self._stage, "tensorboard"),
                             filename_suffix=f".{os.getpid()}.{uuid.uuid4().hex[:8]}")
    self._last_sync = None
    atexit.register(self._finish)

  def write(self, step: int, record: dict) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    for k, v in record.items():
      if isinstance(v, (int, float)) and k != "step":
        self._tb.add_scalar(k, v, step)
    self._tb.flush()
    if self._remote is not None and (self._last_sync is None or
                                     time.monotonic() - self._last_sync >= self._sync_every):
      self._sync()

  def _sync(self) -> None:
    """Copies the staged metrics.jsonl and TensorBoard files to the cloud workdir; a failure
    (a transient network error) is logged and retried at the next sync, never fatal."""
    if self._remote is None or self._jsonl is None:
      return
    self._jsonl.flush()
    self._tb.flush()
    try:
      self._copy_staged()
    except Exception as e:  # noqa: BLE001 - metrics must not stop a training run
      logging.warning("could not copy metrics to %s (%s: %s); retrying at the next sync",
                      self._remote, type(e).__name__, e)
    self._last_sync = time.monotonic()

  def _copy_staged(self) -> None:
    paths.copy_file(os.path.join(self._stage, "metrics.jsonl"), paths.join(self._remote, "metrics.jsonl"))
    tb_local = os.path.join(self._stage, "tensorboard")
    for root, _, files in os.walk(tb_local):
      for name in files:
        rel = os.path.relpath(os.path.join(root, name), tb_local)
        dst = paths.join(self._remote, "tensorboard", *rel.split(os.sep))
        paths.makedirs(paths.dirname(dst))
        paths.copy_file(os.path.join(root, name), dst)

  def close(self) -> None:
    if self._remote is not None:
      atexit.unregister(self._finish)
    self._finish()

  def _finish(self) -> None:
    """Closes the files; a cloud workdir gets its final copy (also run at interpreter exit)."""
    if not self.enabled or self._jsonl is None:
      return
    self._jsonl.close()
    self._tb.close()
    self._jsonl = None
    if self._remote is None:
      return
    try:
      self._copy_staged()
    except Exception as e:  # noqa: BLE001
      logging.error("could not copy metrics to %s (%s: %s); they are kept in %s",
                    self._remote, type(e).__name__, e, self._stage)
      return
    shutil.rmtree(self._stage, ignore_errors=True)
