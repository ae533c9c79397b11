"""Grain input pipelines: random-access source -> shuffled, sharded, tokenized batches.

Train order (every step is Grain's own dataset, so the iterator checkpoints):

  source -> seed/shuffle (global) -> repeat (infinite, reshuffled each epoch)
         -> [process_index::process_count] -> encode -> batch -> to_iter_dataset

Slicing *after* the global shuffle makes the union of all processes' k-th
batches exactly the k-th batch of a single-process run with the same seed.

Batches are dicts of numpy arrays (b = per-process batch, L = max_text_len):
  image (b, S, S, 3) float32 in [-1, 1]; text, targets (b, L) int32;
  text_mask, ar_mask, loss_mask (b, L) bool; family (b,) int32 index into
  ``synthetic.FAMILIES``. Eval batches add valid (b,) bool (False on padding).

Numpy only: Grain workers must never import JAX.
"""

from __future__ import annotations

import grain
import numpy as np

from parcel_jax.data import synthetic
from parcel_jax.data import tokenizer as tokenizer_lib

DATASETS = ('synthetic',)
SPLITS = ('train', 'eval')


def _validate(data_cfg) -> None:
  if data_cfg.name not in DATASETS:
    raise ValueError(f'data.name must be one of {DATASETS}, got {data_cfg.name!r}')
  if data_cfg.image_size <= 0 or data_cfg.image_size % 16:
    raise ValueError(f'data.image_size must be a positive multiple of 16, '
                     f'got {data_cfg.image_size}')
  for field in ('train_size', 'eval_size'):
    if data_cfg[field] <= 0:
      raise ValueError(f'data.{field} must be > 0, got {data_cfg[field]}')
  families = data_cfg.families
  if families and set(families) - set(synthetic.FAMILIES):
    raise ValueError(f'data.families must be None, () (= all) or a subset of '
                     f'{synthetic.FAMILIES}, got {families}')
  needed = synthetic.max_text_tokens()
  if data_cfg.max_text_len < needed:
    raise ValueError(f'data.max_text_len must be >= {needed} (longest synthetic example), '
                     f'got {data_cfg.max_text_len}')


def _check_process(process_index: int, process_count: int) -> None:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'need 0 <= process_index < process_count, '
                     f'got process_index={process_index}, process_count={process_count}')


def build_source(data_cfg, split: str) -> synthetic.SyntheticSource:
  """Random-access source for ``split`` ('train' or 'eval')."""
  _validate(data_cfg)
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  size = data_cfg.train_size if split == 'train' else data_cfg.eval_size
  families = tuple(data_cfg.families) if data_cfg.families else None
  return synthetic.SyntheticSource(split, size, data_cfg.image_size, families)


class _Encode(grain.transforms.Map):
  """Source record -> model inputs (drops the strings, which cannot be batched)."""

  def __init__(self, max_len: int):
    self._tokenizer = tokenizer_lib.synthetic_tokenizer()
    self._max_len = max_len

  def map(self, record: dict) -> dict:
    text = tokenizer_lib.encode_example(
        self._tokenizer, record['question'], record['answer'], self._max_len)
    return {'image': record['image'], **text, 'family': record['family']}


def build_train_dataset(data_cfg, *, seed: int, global_batch_size: int,
                        process_index: int = 0, process_count: int = 1,
                        num_threads: int = 0, prefetch_buffer_size: int = 4,
                        ) -> grain.IterDataset:
  """Infinite, shuffled train batches of ``global_batch_size // process_count``.

  ``num_threads > 0`` prefetches whole batches on that many threads, overlapping
  generation with the train step; the iterator state (and so resume) does not
  depend on it.
  """
  _check_process(process_index, process_count)
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'global_batch_size must be a positive multiple of process_count='
                     f'{process_count}, got global_batch_size={global_batch_size}')
  source = build_source(data_cfg, 'train')
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
  ds = ds[process_index::process_count]
  ds = ds.map(_Encode(data_cfg.max_text_len))
  ds = ds.batch(global_batch_size // process_count, drop_remainder=True)
  read_options = grain.ReadOptions(num_threads=num_threads,
                                   prefetch_buffer_size=prefetch_buffer_size)
  return ds.to_iter_dataset(read_options)


class _EvalRecord(grain.transforms.Map):
  """Index -> encoded eval example; indices >= num_examples repeat example 0, marked invalid."""

  def __init__(self, source: synthetic.SyntheticSource, num_examples: int, max_len: int):
    self._source = source
    self._num_examples = num_examples
    self._encode = _Encode(max_len)

  def map(self, index) -> dict:
    index = int(index)
    record = self._encode.map(self._source[index % self._num_examples])
    return {**record, 'valid': np.bool_(index < self._num_examples)}


def build_eval_dataset(data_cfg, *, batch_size: int, process_index: int = 0,
                       process_count: int = 1, num_examples: int | None = None,
                       ) -> grain.MapDataset:
  """Finite eval batches in a fixed order over the first ``num_examples`` (default
  ``data.eval_size``) eval examples; each appears exactly once with valid=True.

  The examples are padded to a multiple of ``batch_size * process_count`` so every
  batch is full (one compiled shape) and every process runs the same number of
  batches (no collective hangs); padding rows have ``valid == False`` and must be
  excluded from metrics. ``len()`` of the result is the number of batches.
  """
  _check_process(process_index, process_count)
  if batch_size <= 0:
    raise ValueError(f'batch_size must be > 0, got {batch_size}')
  source = build_source(data_cfg, 'eval')
  num_examples = len(source) if num_examples is None else num_examples
  if not 0 < num_examples <= len(source):
    raise ValueError(f'num_examples must be in [1, data.eval_size={len(source)}], '
                     f'got {num_examples}')
  stride = batch_size * process_count
  padded = -(-num_examples // stride) * stride
  ds = grain.MapDataset.range(padded)[process_index::process_count]
  ds = ds.map(_EvalRecord(source, num_examples, data_cfg.max_text_len))
  return ds.batch(batch_size, drop_remainder=True)
