"""The Grain pipeline: shapes, determinism, exact resume, process sharding, eval coverage."""

import hashlib

import grain
import ml_collections
import numpy as np
import pytest

from parcel_jax.data import pipeline
from parcel_jax.data import synthetic as syn
from parcel_jax.data import tokenizer as tok_lib


def _cfg(**overrides):
  cfg = dict(name='synthetic', image_size=32, train_size=1_000_000, eval_size=37,
             families=None, max_text_len=16)
  return ml_collections.ConfigDict({**cfg, **overrides})


def _take(ds, n, state=None):
  """First n batches of a fresh iterator (optionally restored); returns (batches, state)."""
  it = iter(ds)
  try:
    if state is not None:
      it.set_state(state)
    batches = [next(it) for _ in range(n)]
    return batches, it.get_state()
  finally:
    it.close()


def _row_keys(batch):
  """One hash per example (image + text), to compare batches as sets."""
  return [hashlib.sha1(img.tobytes() + txt.tobytes()).hexdigest()
          for img, txt in zip(batch['image'], batch['text'])]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_train_batch_shapes_and_dtypes():
  (batch,), _ = _take(pipeline.build_train_dataset(_cfg(), seed=0, global_batch_size=6), 1)
  expected = {'image': ((6, 32, 32, 3), np.float32), 'family': ((6,), np.int32),
              **{k: ((6, 16), np.int32) for k in ('text', 'targets')},
              **{k: ((6, 16), np.bool_) for k in ('text_mask', 'ar_mask', 'loss_mask')}}
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
  assert batch['image'].min() >= -1 and batch['image'].max() <= 1
  assert (batch['loss_mask'].sum(1) >= 2).all()  # >= one answer token + EOS


def test_train_deterministic_per_seed():
  a, _ = _take(pipeline.build_train_dataset(_cfg(), seed=3, global_batch_size=4), 3)
  b, _ = _take(pipeline.build_train_dataset(_cfg(), seed=3, global_batch_size=4), 3)
  c, _ = _take(pipeline.build_train_dataset(_cfg(), seed=4, global_batch_size=4), 3)
  _assert_batches_equal(a, b)
  assert _row_keys(a[0]) != _row_keys(c[0])


def test_each_epoch_is_a_permutation():
  cfg = _cfg(train_size=20)
  ds = pipeline.build_train_dataset(cfg, seed=0, global_batch_size=5)
  batches, _ = _take(ds, 8)  # two epochs
  source = pipeline.build_source(cfg, 'train')
  all_keys = sorted(hashlib.sha1(source[i]['image'].tobytes()).hexdigest() for i in range(20))
  epochs = [[hashlib.sha1(img.tobytes()).hexdigest() for b in batches[e * 4:(e + 1) * 4]
             for img in b['image']] for e in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == all_keys
  assert epochs[0] != epochs[1]  # reshuffled each epoch


@pytest.mark.parametrize('num_threads', [0, 2])
def test_resume_gives_identical_batches(num_threads):
  ds = pipeline.build_train_dataset(_cfg(), seed=7, global_batch_size=4,
                                    num_threads=num_threads)
  first, state = _take(ds, 3)
  expected, _ = _take(ds, 3 + 4)
  resumed, _ = _take(ds, 4, state=state)
  _assert_batches_equal(expected[3:], resumed)
  assert not np.array_equal(first[0]['image'], resumed[0]['image'])


def test_grain_checkpoint_helper():
  ds = pipeline.build_train_dataset(_cfg(), seed=1, global_batch_size=2)
  grain.experimental.assert_equal_output_after_checkpoint(
      grain.experimental.LimitIterDataset(ds, count=5))


def test_processes_partition_the_global_batch():
  cfg, global_batch = _cfg(), 6
  single, _ = _take(pipeline.build_train_dataset(cfg, seed=2, global_batch_size=global_batch), 3)
  shards = [_take(pipeline.build_train_dataset(cfg, seed=2, global_batch_size=global_batch,
                                               process_index=p, process_count=2), 3)[0]
            for p in range(2)]
  for k in range(3):
    keys = [_row_keys(shard[k]) for shard in shards]
    assert all(len(x) == global_batch // 2 for x in keys)
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == sorted(_row_keys(single[k]))


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match='global_batch_size'):
    pipeline.build_train_dataset(_cfg(), seed=0, global_batch_size=5, process_count=2)
  with pytest.raises(ValueError, match='data.max_text_len'):
    pipeline.build_train_dataset(_cfg(max_text_len=8), seed=0, global_batch_size=4)
  with pytest.raises(ValueError, match='data.name'):
    pipeline.build_source(_cfg(name='coco'), 'train')
  with pytest.raises(ValueError, match='data.families'):
    pipeline.build_source(_cfg(families=('grounding', 'colour')), 'eval')
  with pytest.raises(ValueError, match='data.eval_size'):
    pipeline.build_eval_dataset(_cfg(), batch_size=4, num_examples=38)
  with pytest.raises(ValueError, match='data.family_weights.*colour'):
    pipeline.build_source(_cfg(family_weights={'colour': 2.0}), 'eval')
  with pytest.raises(ValueError, match='data.family_weights'):
    pipeline.build_source(_cfg(family_weights={'detail': -1.0}), 'eval')
  # () and None both mean every family.
  assert pipeline.build_source(_cfg(families=()), 'eval').families is None


def test_family_weights_apply_to_training_only():
  cfg = _cfg(family_weights={f: float(f == 'detail') for f in syn.FAMILIES})
  train = pipeline.build_source(cfg, 'train')
  assert {syn.FAMILIES[int(train[i]['family'])] for i in range(40)} == {'detail'}
  # Named by family, so a family subset keeps its weights; unnamed families weigh 1.
  subset = pipeline.build_source(_cfg(families=('mixed', 'detail'), family_weights={'detail': 3.0}),
                                 'train')
  assert subset.family_weights == (1.0, 3.0)
  assert pipeline.build_source(_cfg(family_weights={}), 'train').family_weights is None
  weighted, uniform = pipeline.build_source(cfg, 'eval'), pipeline.build_source(_cfg(), 'eval')
  assert weighted.family_weights is None
  for i in range(20):  # the eval stream is the uniform one, example for example
    a, b = weighted[i], uniform[i]
    assert (a['question'], a['answer']) == (b['question'], b['answer'])
    np.testing.assert_array_equal(a['image'], b['image'])


@pytest.mark.parametrize('process_count,num_examples', [(1, None), (3, None), (2, 20)])
def test_eval_covers_every_example_once(process_count, num_examples):
  cfg, batch_size = _cfg(), 8
  source = pipeline.build_source(cfg, 'eval')
  expected = sorted(hashlib.sha1(source[i]['image'].tobytes()).hexdigest()
                    for i in range(num_examples or cfg.eval_size))
  seen, lengths = [], set()
  for p in range(process_count):
    ds = pipeline.build_eval_dataset(cfg, batch_size=batch_size, process_index=p,
                                     process_count=process_count, num_examples=num_examples)
    lengths.add(len(ds))
    batches = list(ds)  # finite
    assert len(batches) == len(ds)
    again = list(ds)
    _assert_batches_equal(batches, again)  # deterministic order
    for b in batches:
      assert b['image'].shape[0] == batch_size and b['valid'].dtype == np.bool_
      seen += [hashlib.sha1(img.tobytes()).hexdigest()
               for img, ok in zip(b['image'], b['valid']) if ok]
  assert len(lengths) == 1  # every process runs the same number of batches
  assert sorted(seen) == expected


def test_eval_dataset_reads_the_train_split():
  """build_eval_dataset(split='train'): the training source's first examples in index order,
  each laid out as its record is (layout_example), valid, then invalid padding; asking for
  more than the split holds names data.train_size."""
  rng = np.random.default_rng()
  train_size, batch_size = int(rng.integers(5, 40)), int(rng.integers(2, 9))
  n = int(rng.integers(1, train_size + 1))
  cfg = _cfg(train_size=train_size, eval_size=3)  # more train examples than eval ones
  ds = pipeline.build_eval_dataset(cfg, batch_size=batch_size, num_examples=n, split='train')
  rows = {k: np.concatenate([b[k] for b in ds]) for k in ds[0]}
  assert len(rows['valid']) == -(-n // batch_size) * batch_size
  assert rows['valid'][:n].all() and not rows['valid'][n:].any()
  source, tok = pipeline.build_source(cfg, 'train'), pipeline.build_tokenizer(cfg)
  for i in range(n):
    record = source[i]
    text = tok_lib.encode_example(tok, record['question'], record['answer'], cfg.max_text_len)
    np.testing.assert_array_equal(rows['image'][i], record['image'])
    assert rows['family'][i] == record['family']
    for k, v in text.items():
      np.testing.assert_array_equal(rows[k][i], v, err_msg=f'{k} of train example {i}')
  evals = pipeline.build_source(cfg, 'eval')
  assert not np.array_equal(rows['image'][0], evals[0]['image'])  # not the eval stream
  with pytest.raises(ValueError, match=rf'data.train_size={train_size}\] for the train split'):
    pipeline.build_eval_dataset(cfg, batch_size=batch_size, num_examples=train_size + 1, split='train')
  with pytest.raises(ValueError, match=r'data.eval_size=3\] for the eval split'):
    pipeline.build_eval_dataset(cfg, batch_size=batch_size, num_examples=4)
  with pytest.raises(ValueError, match="split must be one of"):
    pipeline.build_eval_dataset(cfg, batch_size=batch_size, split='test')


def test_eval_and_train_streams_differ():
  train = pipeline.build_source(_cfg(), 'train')
  evals = pipeline.build_source(_cfg(), 'eval')
  assert all(not np.array_equal(train[i]['image'], evals[i]['image'])
             for i in range(10))


def test_frames_are_batched_with_their_frame_mask():
  """data.max_frames = T > 1: image (b, T, S, S, 3) and frame_mask (b, T); a clip fills its
  CLIP_FRAMES frames, a single image its first, the rest zeros; max_frames = 1 is unchanged."""
  rng = np.random.default_rng()
  t = syn.CLIP_FRAMES + int(rng.integers(0, 3))
  families = ('grounding', 'appearance', 'motion')
  cfg = _cfg(families=families, max_frames=t, max_text_len=syn.max_text_tokens(families))
  (batch,), _ = _take(pipeline.build_train_dataset(cfg, seed=int(rng.integers(1 << 20)),
                                                global_batch_size=16), 1)
  assert batch['image'].shape == (16, t, 32, 32, 3) and batch['frame_mask'].shape == (16, t)
  clips = np.isin(batch['family'], [syn.FAMILIES.index(f) for f in syn.TEMPORAL_FAMILIES])
  assert clips.any() and (~clips).any()
  real = np.where(clips, syn.CLIP_FRAMES, 1)
  np.testing.assert_array_equal(batch['frame_mask'], np.arange(t)[None] < real[:, None])
  assert not batch['image'][~batch['frame_mask']].any()
  assert np.abs(batch['image'][batch['frame_mask']]).max(axis=(1, 2, 3)).min() > 0
  eval_cfg = _cfg(families=families, max_frames=t, max_text_len=syn.max_text_tokens(families))
  first = pipeline.build_eval_dataset(eval_cfg, batch_size=4)[0]
  ex = syn.generate('eval', 0, 32, families=families)
  frames = ex.image if ex.image.ndim == 4 else ex.image[None]
  np.testing.assert_array_equal(first['image'][0, :len(frames)], frames)
  single = _take(pipeline.build_train_dataset(_cfg(max_frames=1), seed=3, global_batch_size=8), 1)[0][0]
  assert single['image'].shape == (8, 32, 32, 3) and 'frame_mask' not in single
  unchanged = _take(pipeline.build_train_dataset(_cfg(), seed=3, global_batch_size=8), 1)[0][0]
  _assert_batches_equal([single], [unchanged])


def test_temporal_families_need_enough_frames():
  families = ('motion',)
  with pytest.raises(ValueError, match=r'data.max_frames must be >= 4 .*got 1'):
    pipeline.build_source(_cfg(families=families), 'train')
  with pytest.raises(ValueError, match='data.max_frames must be an integer >= 1'):
    pipeline.build_source(_cfg(max_frames=0), 'train')
