"""Grain input pipelines: random-access source -> shuffled, sharded, tokenized batches.

Train order (every step is Grain's own dataset, so the iterator checkpoints):

  source indices -> seed/shuffle (global) -> repeat (infinite, reshuffled each epoch)
                 -> [process_index::process_count] -> encode (read + lay out) -> batch
                 -> to_iter_dataset

Slicing *after* the global shuffle makes the union of all processes' k-th
batches exactly the k-th batch of a single-process run with the same seed.

Batches are dicts of numpy arrays (b = per-process batch, L = max_text_len):
  image (b, S, S, 3) float32 in [-1, 1]; text, targets (b, L) int32;
  text_mask, ar_mask, loss_mask (b, L) bool; family (b,) int32 index into
  ``synthetic.FAMILIES`` (real data: -1, one family 'all', so metrics report 'overall'
  only). Eval batches add valid (b,) bool (False on padding and on skipped bad examples).
  Real-data batches add has_image (b,) bool: False for a text-only example (its image is
  zeros and the model masks every visual slot out, whatever the budget; ``vlm.VLM``).
  With data.max_frames = T > 1 (video, or several images per example) image is
  (b, T, S, S, 3) and batches add frame_mask (b, T) bool: an example's real frames first,
  the missing ones zeros and False. An example with more frames than T is a bad example
  (malformed_record); a synthetic temporal family needs T >= ``synthetic.CLIP_FRAMES``.

Sources (``data.name``): ``synthetic`` (procedural, ``data/synthetic.py``), ``llava``
(LLaVA JSON + image folder), ``jsonl`` (big_vision-style jsonl), ``tfds`` (TFDS
ArrayRecord through ``tfds.data_source``). Real-data fields (all optional in a config,
defaults in ``REAL_DATA_DEFAULTS``)::

  data.train_path / data.eval_path   llava: the JSON file; jsonl: the .jsonl file
  data.image_root                    folder image paths are relative to ('' = the data file's)
  data.tfds_name, data.tfds_data_dir, data.train_split, data.eval_split   tfds
  data.image_key / prefix_key / suffix_key   record fields (jsonl, tfds)
  data.tokenizer                     Gemma tokenizer: a checkpoint dir, tokenizer.model or .json
  (paths and folders may be local or cloud URIs, gs:// / s3://, read through etils.epath)
  data.on_error                      raise | skip   (bad examples, see below)
  data.max_skip_fraction             skip: error once skipped > fraction x max(seen, min(len, 1000))
  data.long_text                     truncate (drop trailing turns, then cut the suffix tail)
                                     | reject (a bad example)
  data.conversation                  llava: multi_turn (one example per record, every answer
                                     supervised) | single_exchange (one per exchange)

Every source is laid out alike (``tokenizer.layout_example``, PaliGemma's layout). Bad examples
(``images.BAD_KINDS``: missing / corrupt / unreadable images, malformed records, missing
fields, empty answers, text too long) either raise a ``BadDataError`` naming the source
file, the example and the problem (``raise``), or are dropped and counted per kind
(``skip``; train batches stay full, eval examples are marked invalid). The counts live in
a ``BadDataStats`` (``dataset.bad_data_stats``; ``data_metrics(dataset)`` for logs).
Skipping happens after the per-process slice, so with skipped examples the processes'
k-th batches are no longer exactly a single-process run's k-th batch (each is still full,
deterministic and resumable). Train counts are those of the examples consumed so far (not
of read-ahead) and are part of the iterator's state: the checkpoint holds them (per
process, as Grain's state), a resumed run continues them, and ``max_skip_fraction`` is
judged over the whole run.

Numpy only: Grain workers must never import JAX.
"""

from __future__ import annotations

import threading

import grain
import numpy as np

from parcel_jax import paths
from parcel_jax.data import gemma_tokenizer, images, llava, synthetic
from parcel_jax.data import tokenizer as tokenizer_lib

DATASETS = ('synthetic', 'llava', 'jsonl', 'tfds')
REAL_DATASETS = ('llava', 'jsonl', 'tfds')
SPLITS = ('train', 'eval')
ON_ERROR = ('raise', 'skip')
REAL_DATA_DEFAULTS = dict(
    train_path='', eval_path='', image_root='', tfds_name='', tfds_data_dir='',
    train_split='train', eval_split='validation', image_key='image', prefix_key='prefix',
    suffix_key='suffix', tokenizer='', on_error='raise', max_skip_fraction=0.01,
    long_text='truncate', conversation='multi_turn')
REAL_FAMILY = -1  # real data has one family, 'all'
SKIP_CHECK_MIN_SEEN = 1000


def _get(data_cfg, key: str):
  """A real-data field, with its default when the config does not define it."""
  return data_cfg.get(key, REAL_DATA_DEFAULTS[key])


def _validate_real(data_cfg) -> None:
  if data_cfg.image_size <= 0:
    raise ValueError(f'data.image_size must be positive, got {data_cfg.image_size}')
  if _get(data_cfg, 'on_error') not in ON_ERROR:
    raise ValueError(f"data.on_error={_get(data_cfg, 'on_error')!r} is unknown; allowed: {', '.join(ON_ERROR)}")
  if _get(data_cfg, 'long_text') not in gemma_tokenizer.LONG_TEXT_POLICIES:
    raise ValueError(f"data.long_text={_get(data_cfg, 'long_text')!r} is unknown; allowed: "
                     f"{', '.join(gemma_tokenizer.LONG_TEXT_POLICIES)}")
  llava.check_conversation(_get(data_cfg, 'conversation'))
  if not 0 <= _get(data_cfg, 'max_skip_fraction') <= 1:
    raise ValueError(f"data.max_skip_fraction must be in [0, 1], got {_get(data_cfg, 'max_skip_fraction')}")
  if not _get(data_cfg, 'tokenizer'):
    raise ValueError(f'data.tokenizer must name a Gemma tokenizer (checkpoint directory, '
                     f'tokenizer.model or tokenizer.json) for data.name={data_cfg.name!r}')
  if data_cfg.max_text_len < 4:
    raise ValueError(f'data.max_text_len must be >= 4, got {data_cfg.max_text_len}')
  if data_cfg.name == 'tfds' and not _get(data_cfg, 'tfds_name'):
    raise ValueError("data.tfds_name must name a prepared TFDS dataset for data.name='tfds'")
  if data_cfg.name in ('llava', 'jsonl') and not _get(data_cfg, 'train_path'):
    raise ValueError(f'data.train_path must name the {data_cfg.name} file')


def _validate(data_cfg) -> None:
  if data_cfg.name not in DATASETS:
    raise ValueError(f'data.name must be one of {DATASETS}, got {data_cfg.name!r}')
  max_frames = data_cfg.get('max_frames', 1)
  if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1:
    raise ValueError(f'data.max_frames must be an integer >= 1, got {max_frames!r}')
  if data_cfg.name in REAL_DATASETS:
    _validate_real(data_cfg)
    return
  if data_cfg.image_size == 0:
    raise ValueError('data.image_size is 0: it follows model.vision.image_size, which its preset '
                     '(model.vision.variant) fills in parcel_jax.config.validate_config; validate '
                     'the config before building data from it')
  if data_cfg.image_size < 0 or data_cfg.image_size % 16:
    raise ValueError(f'data.image_size must be a positive multiple of 16, '
                     f'got {data_cfg.image_size}')
  for field in ('train_size', 'eval_size'):
    if data_cfg[field] <= 0:
      raise ValueError(f'data.{field} must be > 0, got {data_cfg[field]}')
  families = data_cfg.families
  try:
    families = synthetic.check_families(families)
  except ValueError:
    raise ValueError(f'data.families must be () (= the default mixture) or a subset of '
                     f'{synthetic.FAMILIES}, got {tuple(data_cfg.families)}') from None
  _family_weights(data_cfg)
  if max_frames < synthetic.max_frames(families):
    raise ValueError(f'data.max_frames must be >= {synthetic.max_frames(families)} for the '
                     f'temporal families in data.families={families}, got {max_frames}')
  needed = synthetic.max_text_tokens(families)
  if data_cfg.max_text_len < needed:
    raise ValueError(f'data.max_text_len must be >= {needed} (longest synthetic example), '
                     f'got {data_cfg.max_text_len}')


def _check_process(process_index: int, process_count: int) -> None:
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'need 0 <= process_index < process_count, '
                     f'got process_index={process_index}, process_count={process_count}')


class BadDataError(ValueError):
  """A bad example under data.on_error='raise', or too many under 'skip'."""


class BadDataStats:
  """Thread-safe counts of examples read, skipped (per kind) and truncated, in this process.
  Train: counted as batches are consumed, saved and restored with the iterator's state."""

  def __init__(self):
    self._lock = threading.Lock()
    self.seen = 0
    self.truncated = 0
    self.skipped = {k: 0 for k in images.BAD_KINDS}

  @property
  def total_skipped(self) -> int:
    return sum(self.skipped.values())

  def record(self, *, bad_kind: str | None = None, truncated: bool = False) -> tuple[int, int]:
    with self._lock:
      self.seen += 1
      self.truncated += int(truncated)
      if bad_kind is not None:
        self.skipped[bad_kind] += 1
      return self.seen, self.total_skipped

  def __getstate__(self):  # picklable for worker processes (their counts stay there)
    return {k: v for k, v in self.__dict__.items() if k != '_lock'}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def as_dict(self) -> dict[str, int]:
    with self._lock:
      return {'seen': self.seen, 'truncated': self.truncated, 'skipped': self.total_skipped,
              **{f'skipped_{k}': v for k, v in self.skipped.items()}}

  def get_state(self) -> dict:
    """The counts as JSON-able data (a part of the train iterator's checkpointed state)."""
    with self._lock:
      return {'seen': self.seen, 'truncated': self.truncated, 'skipped': dict(self.skipped)}

  def set_state(self, state: dict) -> None:
    """Continues from ``get_state()``'s counts (kinds unknown here are an error)."""
    unknown = sorted(set(state['skipped']) - set(images.BAD_KINDS))
    if unknown:
      raise ValueError(f'saved bad-data counts name unknown kinds {unknown}; kinds: {images.BAD_KINDS}')
    with self._lock:
      self.seen, self.truncated = int(state['seen']), int(state['truncated'])
      self.skipped = {k: int(state['skipped'].get(k, 0)) for k in images.BAD_KINDS}

  def __repr__(self) -> str:
    return f'BadDataStats({self.as_dict()})'


class ExampleSource:
  """A real source with decoded images: ``source[i]`` -> dict(image (S, S, 3) float32 in
  [-1, 1] (zeros for a text-only example; a record with a list of images: (T, S, S, 3)),
  has_image, question (the prefix), answer (the suffix), turns (later (prompt, answer)
  exchanges), family -1, index), or raises ``images.BadExample`` (also for more than
  ``max_frames`` images). ``path`` and ``describe(i)`` name the file and the example."""

  def __init__(self, raw, image_size: int, max_frames: int = 1):
    self.raw = raw
    self.image_size = int(image_size)
    self.max_frames = int(max_frames)
    self.path = raw.path

  def __len__(self) -> int:
    return len(self.raw)

  def describe(self, index: int) -> str:
    return self.raw.describe(index)

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    rec = self.raw[index]
    has_image = rec['image'] is not None
    if isinstance(rec['image'], (list, tuple)):   # frames, checked before any is decoded
      images.check_frame_count(len(rec['image']), self.max_frames)
      image = np.stack([images.decode_image(frame, self.image_size) for frame in rec['image']])
    else:
      image = (images.decode_image(rec['image'], self.image_size) if has_image
               else np.zeros((self.image_size, self.image_size, 3), np.float32))
    return {'image': image, 'has_image': np.bool_(has_image),
            'question': rec['prefix'], 'answer': rec['suffix'], 'turns': tuple(rec.get('turns', ())),
            'family': np.int32(REAL_FAMILY), 'index': np.int64(index)}

  def __repr__(self) -> str:
    return (f'ExampleSource({self.raw!r}, image_size={self.image_size}, '
            f'max_frames={self.max_frames})')


def _real_source(data_cfg, split: str) -> ExampleSource:
  name = data_cfg.name
  keys = dict(image_key=_get(data_cfg, 'image_key'), prefix_key=_get(data_cfg, 'prefix_key'),
              suffix_key=_get(data_cfg, 'suffix_key'))
  if name == 'tfds':
    from parcel_jax.data import tfds as tfds_source
    tfds_split = _get(data_cfg, 'train_split' if split == 'train' else 'eval_split')
    paths.check_access(_get(data_cfg, 'tfds_data_dir'), 'data.tfds_data_dir')
    raw = tfds_source.TfdsSource(_get(data_cfg, 'tfds_name'), tfds_split,
                                 _get(data_cfg, 'tfds_data_dir'), **keys)
  else:
    path = _get(data_cfg, 'train_path' if split == 'train' else 'eval_path')
    if not path:
      raise ValueError(f'data.{split}_path must name the {name} file for the {split} split')
    paths.check_access(path, f'data.{split}_path')  # first touch: names a missing gcsfs / s3fs
    if _get(data_cfg, 'image_root'):
      paths.check_access(_get(data_cfg, 'image_root'), 'data.image_root')
    if name == 'llava':
      raw = llava.LlavaSource(path, _get(data_cfg, 'image_root'), _get(data_cfg, 'conversation'))
    else:
      from parcel_jax.data import jsonl
      raw = jsonl.JsonlSource(path, _get(data_cfg, 'image_root'), **keys)
  if len(raw) == 0:
    raise ValueError(f'{raw.path}: the {split} source has no examples')
  return ExampleSource(raw, data_cfg.image_size, data_cfg.get('max_frames', 1))


def gemma_tokenizer_path(data_cfg) -> str:
  """``data.tokenizer`` when the data is laid out with that Gemma tokenizer (real data); ''
  for synthetic data, whose word list is no Gemma vocabulary (``data.tokenizer`` unused)."""
  return _get(data_cfg, 'tokenizer') if data_cfg.name in REAL_DATASETS else ''


def build_tokenizer(data_cfg):
  """The data's tokenizer: the synthetic word list, or the Gemma tokenizer of ``data.tokenizer``."""
  if data_cfg.name in REAL_DATASETS:
    path = gemma_tokenizer_path(data_cfg)
    if not path:
      raise ValueError(f'data.tokenizer must name a Gemma tokenizer (checkpoint directory, '
                       f'tokenizer.model or tokenizer.json) for data.name={data_cfg.name!r}')
    paths.check_access(path, 'data.tokenizer')
    return gemma_tokenizer.GemmaTokenizer(path)
  return tokenizer_lib.synthetic_tokenizer(data_cfg.families)


def family_names(data_cfg) -> tuple[str, ...]:
  """Names of the task families in batches' ``family`` (real data: one, 'all', index -1)."""
  return ('all',) if data_cfg.name in REAL_DATASETS else synthetic.FAMILIES


def build_source(data_cfg, split: str):
  """Random-access source for ``split`` ('train' or 'eval'): a ``SyntheticSource`` or,
  for real data, an ``ExampleSource`` (records shaped like synthetic ones)."""
  _validate(data_cfg)
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  if data_cfg.name in REAL_DATASETS:
    return _real_source(data_cfg, split)
  size = data_cfg.train_size if split == 'train' else data_cfg.eval_size
  families = tuple(data_cfg.families) if data_cfg.families else None
  # The training mixture may be skewed; the eval stream stays uniform over the families.
  weights = _family_weights(data_cfg) if split == 'train' else None
  return synthetic.SyntheticSource(split, size, data_cfg.image_size, families, weights)


def _family_weights(data_cfg) -> tuple[float, ...] | None:
  """``data.family_weights`` ({family: weight}; empty = uniform) as one weight per family of
  ``data.families``, in order; families it does not name weigh 1."""
  named = dict(data_cfg.get('family_weights', None) or {})
  unknown = sorted(set(named) - set(synthetic.FAMILIES))
  if unknown:
    raise ValueError(f'data.family_weights names unknown families {unknown}; '
                     f'families: {synthetic.FAMILIES}')
  if not named:
    return None
  families = synthetic.check_families(data_cfg.families)
  weights = tuple(float(named.get(f, 1.0)) for f in families)
  try:
    synthetic.family_probabilities(families, weights)
  except ValueError as e:
    raise ValueError(f'data.family_weights: {e}') from None
  return weights


class _Read:
  """One read example: ``example`` (the model inputs) or, when bad, ``bad_kind`` and
  ``where`` (file, example and problem); ``truncated`` as ``layout_example`` says."""

  __slots__ = ('example', 'bad_kind', 'where', 'truncated')

  def __init__(self, example=None, bad_kind=None, where='', truncated=False):
    self.example, self.bad_kind, self.where, self.truncated = example, bad_kind, where, truncated


class _Encode(grain.transforms.Map):
  """Source index -> the example's model inputs (the strings are dropped: they cannot be
  batched), for any source. ``read`` gives a ``_Read`` (the inputs, or what was bad with a
  real example; BadDataError under data.on_error=raise), ``count`` applies the skip policy
  to a read, ``map`` does both (None: a skipped example).

  Synthetic examples are never bad and always fit (``_validate``): they are not counted
  (no stats), never truncated, and one that does not fit raises TextTooLong (a bug)."""

  def __init__(self, source, data_cfg, stats: BadDataStats | None = None):
    self.real = data_cfg.name in REAL_DATASETS
    self._source = source
    self.tokenizer = build_tokenizer(data_cfg)
    self._max_len = data_cfg.max_text_len
    self._long_text = _get(data_cfg, 'long_text') if self.real else 'reject'
    self._on_error = _get(data_cfg, 'on_error')
    self._max_skip = float(_get(data_cfg, 'max_skip_fraction'))
    self._max_frames = data_cfg.get('max_frames', 1)
    self._stats = stats

  def read(self, index) -> _Read:
    index = int(index)
    try:
      record = self._source[index]
      image, frame_mask = images.pad_frames(record['image'], self._max_frames)
      try:
        text, truncated = tokenizer_lib.layout_example(
            self.tokenizer, record['question'], record['answer'], self._max_len, self._long_text,
            turns=record.get('turns', ()))
      except tokenizer_lib.TextTooLong as e:
        if not self.real:
          raise
        raise images.BadExample('text_too_long', str(e)) from e
    except images.BadExample as e:
      where = f'{self._source.path}: {self._source.describe(index)}'
      if self._on_error == 'raise':
        raise BadDataError(f'{where}: {e.kind}: {e.message} (data.on_error=raise; set '
                           f'data.on_error=skip to drop such examples)') from e
      return _Read(bad_kind=e.kind, where=f'{where}: {e.kind}: {e.message}')
    example = {'image': image, **text, 'family': record['family']}
    if frame_mask is not None:
      example['frame_mask'] = frame_mask
    if self.real:
      example['has_image'] = record['has_image']
    return _Read(example, truncated=truncated)

  def count(self, read: _Read) -> dict | None:
    """Counts ``read`` in the stats -> its example, or None if it is skipped; BadDataError
    once the skipped examples pass data.max_skip_fraction."""
    if self._stats is None:  # synthetic: nothing to count, nothing is skipped
      return read.example
    seen, skipped = self._stats.record(bad_kind=read.bad_kind, truncated=read.truncated)
    if read.bad_kind is None:
      return read.example
    limit = self._max_skip * max(seen, min(len(self._source), SKIP_CHECK_MIN_SEEN))
    if skipped > limit:
      raise BadDataError(f'{self._source.path}: skipped {skipped} bad examples of {seen} read, more '
                         f'than data.max_skip_fraction={self._max_skip} allows; last: {read.where}; '
                         f'counts: {self._stats.as_dict()}')
    return None

  def map(self, index) -> dict | None:
    return self.count(self.read(index))


def _bad_data_stats(data_cfg, stats: BadDataStats | None) -> BadDataStats | None:
  """The bad-data counts of a real source (``stats``, default new ones); None for synthetic."""
  if data_cfg.name not in REAL_DATASETS:
    return None
  return stats if stats is not None else BadDataStats()


class _CountedIterator(grain.DatasetIterator):
  """Counts reads as they are consumed and yields the good examples; the counts are a part
  of the state, so a restored iterator continues them. (``_stats`` is Grain's own.)"""

  def __init__(self, parent, encode: _Encode, stats: BadDataStats):
    super().__init__(parent)
    self._encode, self._counts = encode, stats

  def __next__(self) -> dict:
    while True:
      example = self._encode.count(next(self._parent))
      if example is not None:
        return example

  def get_state(self) -> dict:
    return {'reads': self._parent.get_state(), 'bad_data': self._counts.get_state()}

  def set_state(self, state) -> None:
    if isinstance(state, dict) and set(state) == {'reads', 'bad_data'}:
      self._parent.set_state(state['reads'])
      self._counts.set_state(state['bad_data'])
    else:  # a checkpoint written before the counts were saved: they start at zero
      self._parent.set_state(state)


class _Counted(grain.IterDataset):
  """The train stream of reads -> good examples, counted (``_CountedIterator``)."""

  def __init__(self, parent: grain.IterDataset, encode: _Encode, stats: BadDataStats):
    super().__init__(parent)
    self._encode, self._counts = encode, stats

  def __iter__(self) -> _CountedIterator:
    return _CountedIterator(self._parent.__iter__(), self._encode, self._counts)


def data_metrics(dataset) -> dict[str, int]:
  """Bad-data counts of a dataset built here (empty for synthetic data), for logging."""
  stats = getattr(dataset, 'bad_data_stats', None)
  return {f'data/{k}': v for k, v in stats.as_dict().items()} if stats is not None else {}


def build_train_dataset(data_cfg, *, seed: int, global_batch_size: int,
                        process_index: int = 0, process_count: int = 1,
                        num_threads: int = 0, prefetch_buffer_size: int = 4,
                        stats: BadDataStats | None = None) -> grain.IterDataset:
  """Infinite, shuffled train batches of ``global_batch_size // process_count``.

  ``num_threads > 0`` prefetches whole batches on that many threads, overlapping
  generation with the train step; the iterator state (and so resume) does not
  depend on it. Real data: skipped examples are dropped before batching (batches stay
  full); ``stats`` (default: a new one) counts them, also as ``.bad_data_stats``.
  """
  _check_process(process_index, process_count)
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f'global_batch_size must be a positive multiple of process_count='
                     f'{process_count}, got global_batch_size={global_batch_size}')
  source = build_source(data_cfg, 'train')
  stats = _bad_data_stats(data_cfg, stats)
  encode = _Encode(source, data_cfg, stats)
  indices = grain.MapDataset.range(len(source)).seed(seed).shuffle().repeat()
  indices = indices[process_index::process_count]
  batch_size = global_batch_size // process_count
  read_options = grain.ReadOptions(num_threads=num_threads,
                                   prefetch_buffer_size=prefetch_buffer_size)
  if not encode.real:  # nothing to skip: whole batches are prefetched
    ds = indices.map(encode).batch(batch_size, drop_remainder=True)
    return ds.to_iter_dataset(read_options)
  # Reads (good or bad) are prefetched; they are counted, and the bad ones dropped, as they
  # are consumed, so the counts match the iterator's state exactly.
  ds = _Counted(indices.map(encode.read).to_iter_dataset(read_options), encode, stats)
  ds = ds.batch(batch_size, drop_remainder=True)
  ds.bad_data_stats = stats
  return ds


class _EvalRecord(grain.transforms.Map):
  """Index -> encoded eval example and ``valid``. Indices >= num_examples pad the last batches
  and are invalid: synthetic data repeats example ``index % num_examples`` there; real data
  reads nothing (no image decode, no count) and gives a placeholder, as for a skipped bad
  example."""

  def __init__(self, source, data_cfg, num_examples: int, stats: BadDataStats | None):
    self._encode = _Encode(source, data_cfg, stats)
    self._num_examples = num_examples
    self._size = data_cfg.image_size
    self._max_frames = data_cfg.get('max_frames', 1)
    self._max_len = data_cfg.max_text_len

  def _placeholder(self) -> dict:
    zeros = np.zeros(self._max_len, bool)
    pad = self._encode.tokenizer.pad_id
    image, frame_mask = images.pad_frames(np.zeros((self._size, self._size, 3), np.float32),
                                          self._max_frames)
    frames = {} if frame_mask is None else {'frame_mask': np.zeros_like(frame_mask)}
    return {'image': image, **frames,
            'text': np.full(self._max_len, pad, np.int32), 'text_mask': zeros,
            'ar_mask': zeros, 'targets': np.full(self._max_len, pad, np.int32),
            'loss_mask': zeros, 'family': np.int32(REAL_FAMILY), 'has_image': np.bool_(False)}

  def map(self, index) -> dict:
    index = int(index)
    padding = index >= self._num_examples
    example = (None if padding and self._encode.real
               else self._encode.map(index % self._num_examples))
    valid = not padding and example is not None
    return {**(example if example is not None else self._placeholder()), 'valid': np.bool_(valid)}


def build_eval_dataset(data_cfg, *, batch_size: int, process_index: int = 0,
                       process_count: int = 1, num_examples: int | None = None,
                       stats: BadDataStats | None = None, split: str = 'eval') -> grain.MapDataset:
  """Finite batches in a fixed order over the first ``num_examples`` (default: the split's
  size) examples of ``split``; each appears exactly once with valid=True.

  ``split`` 'eval' is the eval stream; 'train' lays the training source out the same way,
  in index order (no shuffle, no repeat): the examples a tool scores on the training split.
  The examples are padded to a multiple of ``batch_size * process_count`` so every
  batch is full (one compiled shape) and every process runs the same number of
  batches (no collective hangs); padding rows have ``valid == False`` and must be
  excluded from metrics. ``len()`` of the result is the number of batches.
  """
  _check_process(process_index, process_count)
  if batch_size <= 0:
    raise ValueError(f'batch_size must be > 0, got {batch_size}')
  source = build_source(data_cfg, split)
  num_examples = len(source) if num_examples is None else num_examples
  if not 0 < num_examples <= len(source):
    bound = (f'the {len(source)} examples of {source.path}' if data_cfg.name in REAL_DATASETS
             else f'data.{split}_size={len(source)}')
    raise ValueError(f'num_examples must be in [1, {bound}] for the {split} split, got {num_examples}')
  stride = batch_size * process_count
  padded = -(-num_examples // stride) * stride
  ds = grain.MapDataset.range(padded)[process_index::process_count]
  stats = _bad_data_stats(data_cfg, stats)
  ds = ds.map(_EvalRecord(source, data_cfg, num_examples, stats))
  ds = ds.batch(batch_size, drop_remainder=True)
  if stats is not None:
    ds.bad_data_stats = stats
  return ds
