"""Properties of the procedural VQA data and of the tokenizer's text layout."""

import collections
import dataclasses
import itertools

import numpy as np
import pytest

from parcel_jax.data import synthetic as syn
from parcel_jax.data import tokenizer as tok_lib


def _fresh_rng():
  seed = np.random.SeedSequence().entropy
  print(f'rng seed: {seed}')  # shown by pytest on failure, to reproduce
  return np.random.default_rng(seed)


def _examples(family, n=60, split='train', image_size=64):
  return [syn.generate(split, i, image_size, families=(family,)) for i in range(n)]


def _colours_in(question):
  return [w for w in question.split() if w in syn.COLOURS]


def test_deterministic_per_split_and_index():
  for index in (0, 1, 12345, 10**9):
    a, b = syn.generate('train', index), syn.generate('train', index)
    np.testing.assert_array_equal(a.image, b.image)
    assert (a.question, a.answer, a.layout) == (b.question, b.answer, b.layout)
    other = syn.generate('eval', index)
    assert not np.array_equal(a.image, other.image)


def test_families_roughly_uniform_and_restrictable():
  n = 1500
  counts = collections.Counter(syn.generate('train', i).family for i in range(n))
  assert set(counts) == set(syn.DEFAULT_FAMILIES)
  expected = n / len(syn.DEFAULT_FAMILIES)
  for family, count in counts.items():  # binomial sd ~ 15.5; allow > 5 sd
    assert abs(count - expected) < 80, (family, count)
  only = {syn.generate('eval', i, families=('relation', 'mixed')).family for i in range(50)}
  assert only == {'relation', 'mixed'}
  with pytest.raises(ValueError, match='families'):
    syn.generate('train', 0, families=('nope',))
  assert syn.generate('train', 5, families=()).layout == syn.generate('train', 5).layout


def test_family_weights_skew_the_mixture():
  n = 2000
  weights = (3, 1, 1, 0, 1)  # grounding 1/2, counting never
  counts = collections.Counter(syn.generate('train', i, family_weights=weights).family
                               for i in range(n))
  assert counts['counting'] == 0 and set(counts) == set(syn.DEFAULT_FAMILIES) - {'counting'}
  assert abs(counts['grounding'] / n - 0.5) < 0.05, counts  # binomial sd ~ 0.011
  for family in ('relation', 'detail', 'mixed'):
    assert abs(counts[family] / n - 1 / 6) < 0.04, counts
  # With a family subset the weights follow its order.
  only = collections.Counter(syn.generate('train', i, families=('detail', 'mixed'),
                                          family_weights=(0, 1)).family for i in range(50))
  assert only == {'mixed': 50}
  # Equal weights are the uniform stream itself, example for example.
  for i in range(20):
    assert syn.generate('train', i, family_weights=(2,) * 5).layout == syn.generate('train', i).layout
  # Examples stay pure functions of (split, index, families, weights).
  a, b = (syn.generate('train', 7, family_weights=weights) for _ in range(2))
  np.testing.assert_array_equal(a.image, b.image)
  for bad in ((1, 1), (1, -1, 1, 1, 1), (0, 0, 0, 0, 0), (1, float('nan'), 1, 1, 1)):
    with pytest.raises(ValueError, match='family weights'):
      syn.generate('train', 0, family_weights=bad)
    with pytest.raises(ValueError, match='family weights'):
      syn.SyntheticSource('train', 10, family_weights=bad)


@pytest.mark.parametrize('image_size', [32, 64])
def test_images_and_words_valid(image_size):
  vocab = set(syn.vocabulary())
  assert len(vocab) == len(syn.vocabulary())
  for i in range(300):
    ex = syn.generate('eval', i, image_size)
    assert ex.image.shape == (image_size, image_size, 3) and ex.image.dtype == np.float32
    assert ex.image.min() >= -1.0 and ex.image.max() <= 1.0
    assert ex.answer in syn.answers(ex.family)
    assert set(ex.question.split()) | set(ex.answer.split()) <= vocab
    words = len(ex.question.split()), len(ex.answer.split())
    assert words[0] <= syn.MAX_QUESTION_WORDS and words[1] <= syn.MAX_ANSWER_WORDS
    slots = [(it.row, it.col) for it in ex.layout.items]
    assert len(set(slots)) == len(slots) and all(0 <= r < 8 and 0 <= c < 8 for r, c in slots)
    np.testing.assert_array_equal(ex.image, syn.render(ex.layout, image_size))


def _block_means(image, block):
  """(S, S, 3) -> (S/block, S/block, 3) mean colour of each aligned block, in float64."""
  s = image.shape[0] // block
  return image.astype(np.float64).reshape(s, block, s, block, 3).mean(axis=(1, 3))


@pytest.mark.parametrize('image_size', [48, 64])
def test_glyph_class_never_changes_pooled_means(image_size):
  rng = _fresh_rng()
  indices = rng.choice(10**8, size=24, replace=False)
  for index in indices:
    ex = syn.generate('train', int(index), image_size, families=('detail', 'mixed'))
    glyphs = [k for k, it in enumerate(ex.layout.items) if it.kind == 'glyph']
    assert glyphs
    items = list(ex.layout.items)
    for k in glyphs:  # a different class and a random phase for every glyph
      others = [g for g in syn.GLYPHS if g != items[k].label]
      items[k] = dataclasses.replace(items[k], label=str(rng.choice(others)),
                                     polarity=int(rng.choice([-1, 1])))
    swapped = syn.render(dataclasses.replace(ex.layout, items=tuple(items)), image_size)
    blank = syn.render(dataclasses.replace(
        ex.layout, items=tuple(it for it in items if it.kind != 'glyph')), image_size)
    assert not np.array_equal(swapped, ex.image)
    for block in (image_size // 4, image_size // 8):  # 4x4-patch and 2x2-patch blocks
      np.testing.assert_allclose(_block_means(swapped, block), _block_means(ex.image, block),
                                 rtol=0, atol=1e-6)
      np.testing.assert_allclose(_block_means(blank, block), _block_means(ex.image, block),
                                 rtol=0, atol=1e-6)


def test_glyphs_balanced_and_distinct_per_patch():
  for name, s in itertools.product(syn.GLYPHS, range(2, 34, 2)):
    pattern = syn.glyph_pattern(name, s)
    assert (pattern == 1).sum() == (pattern == -1).sum() == s * s // 2, (name, s)
  # At 64 px a patch is 4 px: no 4x4 patch (either phase) is shared by two classes.
  def patches(name):
    p = syn.glyph_pattern(name, 8)
    return {(sign * p[i:i + 4, j:j + 4]).tobytes()
            for i in (0, 4) for j in (0, 4) for sign in (1, -1)}
  for a, b in itertools.combinations(syn.GLYPHS, 2):
    assert not patches(a) & patches(b), (a, b)


def test_grounding_answer_is_target_cell():
  for ex in _examples('grounding'):
    (colour,) = _colours_in(ex.question)
    (target,) = [it for it in ex.layout.items if it.label == colour]
    assert 2 <= len(ex.layout.items) <= 4
    assert ex.answer == f'row{target.cell[0] + 1} col{target.cell[1] + 1}'


def test_relation_answer_matches_positions():
  for ex in _examples('relation', n=120):
    subject_colour, reference_colour = _colours_in(ex.question)
    by_colour = {it.label: it for it in ex.layout.items}
    assert len(by_colour) == 2
    subject, reference = by_colour[subject_colour], by_colour[reference_colour]
    dr, dc = subject.row - reference.row, subject.col - reference.col
    # Unambiguous: >= 2 slots (a different cell) on one axis, <= 1 on the other.
    expected = {'left': dc <= -2 and abs(dr) <= 1, 'right': dc >= 2 and abs(dr) <= 1,
                'above': dr <= -2 and abs(dc) <= 1, 'below': dr >= 2 and abs(dc) <= 1}
    assert [k for k, v in expected.items() if v] == [ex.answer]
    assert subject.cell != reference.cell


def test_counting_answer_equals_target_count():
  seen = set()
  for ex in _examples('counting', n=120):
    (colour,) = _colours_in(ex.question)
    count = sum(it.kind == 'square' and it.label == colour for it in ex.layout.items)
    assert ex.answer == syn.COUNT_WORDS[count - 1]
    seen.add(count)
  assert seen == {1, 2, 3, 4}


def test_detail_and_mixed_answers_name_the_glyph():
  for ex in _examples('detail'):
    (glyph,) = [it for it in ex.layout.items if it.kind == 'glyph']
    assert ex.answer == glyph.label
  for ex in _examples('mixed'):
    glyphs = [it for it in ex.layout.items if it.kind == 'glyph']
    assert 2 <= len(glyphs) <= 4 and len(glyphs) == len(ex.layout.items)
    assert len({g.cell for g in glyphs}) == len({g.label for g in glyphs}) == len(glyphs)
    row, col = (int(w[3:]) - 1 for w in ex.question.split()[-2:])
    (asked,) = [g for g in glyphs if g.cell == (row, col)]
    assert ex.answer == asked.label


def test_source_is_random_access():
  src = syn.SyntheticSource('eval', 10, image_size=32, families=('counting',))
  assert len(src) == 10 and 'eval' in repr(src)
  record = src[3]
  ex = syn.generate('eval', 3, 32, families=('counting',))
  np.testing.assert_array_equal(record['image'], ex.image)
  assert record['answer'] == ex.answer
  assert record['family'] == syn.FAMILIES.index('counting')
  with pytest.raises(IndexError):
    src[10]


# --- tokenizer ---------------------------------------------------------------


def test_tokenizer_round_trip():
  tok = tok_lib.synthetic_tokenizer()
  assert tok.vocab_size == 5 + len(syn.vocabulary())
  assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.sep_id) == (0, 1, 2, 3)
  for i in range(100):
    ex = syn.generate('train', i)
    text = f'{ex.question} {ex.answer}'
    assert tok.decode(tok.encode(text)) == text
  assert tok.encode('what zebra') == [tok.encode('what')[0], 4]
  assert tok.decode([1, *tok.encode('how many'), 2, *tok.encode('red')]) == 'how many'


def test_encode_example_layout():
  tok = tok_lib.WordTokenizer(['a', 'b', 'c'])  # ids 5, 6, 7
  out = tok_lib.encode_example(tok, 'a b', 'c a', max_len=9)
  #                              BOS a  b  SEP c  a  EOS PAD PAD
  np.testing.assert_array_equal(out['text'], [1, 5, 6, 3, 7, 5, 2, 0, 0])
  np.testing.assert_array_equal(out['targets'], [5, 6, 3, 7, 5, 2, 0, 0, 0])
  np.testing.assert_array_equal(out['text_mask'], [1, 1, 1, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(out['ar_mask'], [0, 0, 0, 0, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(out['loss_mask'], [0, 0, 0, 1, 1, 1, 0, 0, 0])
  assert out['text'].dtype == out['targets'].dtype == np.int32
  assert all(out[k].dtype == bool for k in ('text_mask', 'ar_mask', 'loss_mask'))
  exact = tok_lib.encode_example(tok, 'a b', 'c a', max_len=7)  # no padding needed
  assert exact['text_mask'].all() and exact['targets'][-1] == 0
  with pytest.raises(tok_lib.TextTooLong, match='7 tokens.*max_text_len is 6'):
    tok_lib.encode_example(tok, 'a b', 'c a', max_len=6)


def test_longest_synthetic_example_fits_bound():
  tok = tok_lib.synthetic_tokenizer()
  lengths = [int(tok_lib.encode_example(tok, e.question, e.answer, 32)['text_mask'].sum())
             for e in (syn.generate('train', i) for i in range(300))]
  assert max(lengths) <= syn.max_text_tokens()


# ---------------------------------------------------------------- fine families


def _cell_pooled_features(image, patch, weights):
  """M3 at 16 tokens: a position-free feature pooled over each cell, (4, 4, k)."""
  return _block_pooled_features(image, patch, weights, 4)


def _relabel(layout, moves):
  """``layout`` with items moved: moves maps an item index to its new (row, col)."""
  items = list(layout.items)
  for k, (r, c) in moves.items():
    items[k] = dataclasses.replace(items[k], row=r, col=c)
  return dataclasses.replace(layout, items=tuple(items))


@pytest.mark.parametrize('family', ['fine_grounding', 'fine_detail', 'reading'])
def test_fine_families_valid_and_deterministic(family):
  vocab = set(syn.vocabulary((family,)))
  max_q, max_a = syn.TEXT_WORDS[family]
  for split in ('train', 'eval'):
    for ex in _examples(family, 80, split):
      assert ex.family == family and ex.answer in syn.answers(family)
      assert set(ex.question.split()) | set(ex.answer.split()) <= vocab
      assert len(ex.question.split()) <= max_q and len(ex.answer.split()) <= max_a
      again = syn.generate(split, ex.index, families=(family,))
      np.testing.assert_array_equal(ex.image, again.image)
      assert (again.question, again.answer) == (ex.question, ex.answer)
  train = {e.image.tobytes() for e in _examples(family, 300, 'train')}
  assert not train & {e.image.tobytes() for e in _examples(family, 300, 'eval')}


def _page_symbols(layout):
  return [it for it in layout.items if it.kind == 'symbol']


def test_symbols_balanced_inside_their_patch_and_distinct():
  """At 64 px a symbol is one 4 px patch: zero-sum in every channel, and no two
  (class, phase) pairs draw the same patch."""
  drawn = set()
  for name in syn.GLYPHS:
    pattern = syn.glyph_pattern(name, 4)
    assert pattern.sum() == 0
    for sign in (1, -1):
      drawn.add((sign * pattern).tobytes())
  assert len(drawn) == 2 * len(syn.GLYPHS)
  with pytest.raises(ValueError, match='image_size >= 64'):
    syn.generate('train', 0, 32, families=('fine_detail',))


def test_fine_detail_answer_is_the_named_symbol_of_the_page():
  answers = collections.Counter()
  r0, c0 = (syn.PAGE_SIDE * k for k in syn.PAGE_CELL)
  for ex in _examples('fine_detail', 200):
    symbols = _page_symbols(ex.layout)
    assert sorted((s.row, s.col) for s in symbols) == [
        (r0 + i, c0 + j) for i in range(syn.PAGE_SIDE) for j in range(syn.PAGE_SIDE)]
    assert all(it.cell != syn.PAGE_CELL for it in ex.layout.items if it.kind == 'square')
    line, char = (int(w[4:]) - 1 for w in ex.question.split()[-2:])
    assert ex.question.startswith('what pattern is at line')
    assert [s.label for s in symbols if (s.row, s.col) == (r0 + line, c0 + char)] == [ex.answer]
    answers[ex.answer] += 1
  assert set(answers) == set(syn.GLYPHS) and max(answers.values()) < 0.3 * 200


def _permuted_page(layout, rng, within_blocks_of=0):
  """``layout`` with its symbols' classes and phases permuted among the page's patches
  (``within_blocks_of`` = k > 0: only inside each k x k-patch block)."""
  items = list(layout.items)
  ids = [k for k, it in enumerate(items) if it.kind == 'symbol']
  groups = collections.defaultdict(list)
  for k in ids:
    key = (items[k].row // within_blocks_of, items[k].col // within_blocks_of) if within_blocks_of else 0
    groups[key].append(k)
  new = list(items)
  for members in groups.values():
    for k, src in zip(members, rng.permutation(members)):
      new[k] = dataclasses.replace(items[k], label=items[src].label, polarity=items[src].polarity)
  return dataclasses.replace(layout, items=tuple(new))


def _block_pooled_features(image, patch, weights, block):
  """A position-free nonlinear feature of every patch, averaged over aligned block x block
  patches (M3's pooling: block 4 -> 16 tokens, 2 -> 64 tokens)."""
  g = image.shape[0] // patch
  patches = image.reshape(g, patch, g, patch, 3).transpose(0, 2, 1, 3, 4).reshape(g, g, -1)
  feats = np.tanh(patches.astype(np.float64) @ weights)
  return feats.reshape(g // block, block, g // block, block, -1).mean(axis=(1, 3))


def test_page_arrangement_invisible_to_every_pooled_budget():
  """Rearranging the page changes the answers, yet leaves every patch mean unchanged, and
  leaves any position-free feature pooled over the cell (16 tokens), or over 2x2 patches
  (64 tokens) when the rearrangement stays inside each 2x2 block, exactly as it was."""
  rng = _fresh_rng()
  weights = rng.normal(size=(4 * 4 * 3, 16))
  changed = 0
  for ex in _examples('fine_detail', 30, 'eval'):
    for block, pooled_block in ((0, 4), (2, 2)):
      moved = _permuted_page(ex.layout, rng, within_blocks_of=block)
      image = syn.render(moved, 64)
      np.testing.assert_allclose(_block_means(image, 4), _block_means(ex.image, 4), atol=1e-6)
      np.testing.assert_allclose(_block_pooled_features(image, 4, weights, pooled_block),
                                 _block_pooled_features(ex.image, 4, weights, pooled_block),
                                 atol=1e-12)
      changed += [s.label for s in _page_symbols(moved)] != [s.label for s in _page_symbols(ex.layout)]
  assert changed >= 50  # 16 symbols of 5 classes: a permutation nearly always moves one


def test_reading_answer_is_the_named_line_in_order():
  r0, c0 = (syn.PAGE_SIDE * k for k in syn.PAGE_CELL)
  lines = collections.Counter()
  for ex in _examples('reading', 100):
    (word,) = ex.question.split()[-1:]
    line = int(word[4:]) - 1
    lines[line] += 1
    row = sorted((s.col, s.label) for s in _page_symbols(ex.layout) if s.row == r0 + line)
    assert [c for c, _ in row] == list(range(c0, c0 + syn.PAGE_SIDE))
    assert ex.answer == ' '.join(label for _, label in row)
  assert set(lines) == set(range(syn.PAGE_SIDE))


def test_fine_grounding_answers_the_slot_and_cell_pooling_cannot():
  rng = _fresh_rng()
  weights = rng.normal(size=(4 * 4 * 3, 16))
  for ex in _examples('fine_grounding', 60):
    target = ex.layout.items[0]
    assert _colours_in(ex.question) == [target.label]
    assert ex.answer == f'y{target.row + 1} x{target.col + 1}'
    others = {(it.row, it.col) for it in ex.layout.items[1:]}
    free = [(2 * target.cell[0] + i, 2 * target.cell[1] + j) for i in (0, 1) for j in (0, 1)
            if (2 * target.cell[0] + i, 2 * target.cell[1] + j) not in others | {(target.row, target.col)}]
    if not free:
      continue
    moved = syn.render(_relabel(ex.layout, {0: free[0]}), 64)
    np.testing.assert_allclose(_cell_pooled_features(moved, 4, weights),
                               _cell_pooled_features(ex.image, 4, weights), atol=1e-12)
  answers = {e.answer for e in _examples('fine_grounding', 600)}
  assert len(answers) > 56  # nearly all 64 slots occur


def test_text_length_bound_follows_the_families():
  assert syn.vocabulary() == syn.vocabulary(syn.DEFAULT_FAMILIES)  # ids of the default unchanged
  fine = syn.vocabulary(syn.FINE_FAMILIES)
  assert fine[:len(syn.vocabulary())] == syn.vocabulary() and len(set(fine)) == len(fine)
  for families in ((), syn.FINE_FAMILIES, ('reading',)):
    tok = tok_lib.synthetic_tokenizer(families)
    exs = [syn.generate('train', i, families=families) for i in range(200)]
    lengths = [int(tok_lib.encode_example(tok, e.question, e.answer, 32)['text_mask'].sum()) for e in exs]
    assert max(lengths) == syn.max_text_tokens(families)


# ------------------------------------------------------------------ temporal families (clips)

def _square_at(image, row, col):
  """The mean colour of slot (row, col)'s interior (where a square is drawn), (3,)."""
  s = image.shape[0] // syn.SLOTS
  m = max(1, s // 8)
  return image[row * s + m:(row + 1) * s - m, col * s + m:(col + 1) * s - m].mean((0, 1))


def test_temporal_clips_are_pure_and_drawn_from_their_frame_layouts():
  rng = _fresh_rng()
  for family in syn.TEMPORAL_FAMILIES:
    for index in rng.integers(0, 10**9, size=20):
      ex = syn.generate('train', int(index), families=(family,))
      again = syn.generate('train', int(index), families=(family,))
      np.testing.assert_array_equal(ex.image, again.image)
      assert (ex.question, ex.answer) == (again.question, again.answer)
      assert ex.image.shape == (syn.CLIP_FRAMES, 64, 64, 3) and ex.image.dtype == np.float32
      assert len(ex.frame_layouts) == syn.CLIP_FRAMES and ex.layout == ex.frame_layouts[0]
      assert len({layout.background for layout in ex.frame_layouts}) == 1
      for frame, layout in zip(ex.image, ex.frame_layouts):
        np.testing.assert_array_equal(frame, syn.render(layout, 64))
      assert ex.answer in syn.answers(family)
      other = syn.generate('eval', int(index), families=(family,))
      assert not np.array_equal(other.image, ex.image)


def test_appearance_answers_the_only_frame_with_the_target():
  for ex in _examples('appearance', 80):
    (target,) = _colours_in(ex.question)
    frames = [t for t, layout in enumerate(ex.frame_layouts)
              if any(it.label == target for it in layout.items)]
    assert len(frames) == 1 and ex.answer == f'frame{frames[0] + 1}'
    # every frame has squares, so a frame's square count does not give the answer away
    assert all(len(layout.items) >= 1 for layout in ex.frame_layouts)
    item = next(it for it in ex.frame_layouts[frames[0]].items if it.label == target)
    np.testing.assert_allclose(_square_at(ex.image[frames[0]], item.row, item.col),
                               syn.COLOURS[target])
  answers = collections.Counter(e.answer for e in _examples('appearance', 400))
  assert set(answers) == set(syn.answers('appearance')) and min(answers.values()) > 60


def test_motion_answers_the_direction_of_the_moving_square():
  for ex in _examples('motion', 80):
    subject = _colours_in(ex.question)[0]
    path = [next((it.row, it.col) for it in layout.items if it.label == subject)
            for layout in ex.frame_layouts]
    steps = {(r1 - r0, c1 - c0) for (r0, c0), (r1, c1) in zip(path, path[1:])}
    assert steps == {syn.MOTIONS[ex.answer]}
    assert all(0 <= r < syn.SLOTS and 0 <= c < syn.SLOTS for r, c in path)
    still = {tuple((it.label, it.row, it.col) for it in layout.items if it.label != subject)
             for layout in ex.frame_layouts}
    assert len(still) == 1   # the distractor does not move
    for t, (r, c) in enumerate(path):
      np.testing.assert_allclose(_square_at(ex.image[t], r, c), syn.COLOURS[subject])
    # the single frames alone do not tell the direction: frame 0 is a valid start for others
  answers = collections.Counter(e.answer for e in _examples('motion', 400))
  assert set(answers) == set(syn.MOTIONS) and min(answers.values()) > 60


def test_temporal_families_are_opt_in_and_keep_every_id():
  assert not set(syn.TEMPORAL_FAMILIES) & set(syn.DEFAULT_FAMILIES)
  assert syn.FAMILIES[:8] == ('grounding', 'relation', 'detail', 'counting', 'mixed',
                              'fine_grounding', 'fine_detail', 'reading')
  fine = syn.vocabulary(syn.FINE_FAMILIES)
  clips = syn.vocabulary(('motion', 'appearance'))
  assert clips[:len(fine)] == fine and len(set(clips)) == len(clips)
  assert syn.max_frames() == syn.max_frames(syn.FINE_FAMILIES) == 1
  assert syn.max_frames(('grounding', 'motion')) == syn.CLIP_FRAMES
  families = ('appearance', 'motion')
  tok = tok_lib.synthetic_tokenizer(families)
  exs = [syn.generate('train', i, families=families) for i in range(100)]
  lengths = [int(tok_lib.encode_example(tok, e.question, e.answer, 32)['text_mask'].sum()) for e in exs]
  assert max(lengths) == syn.max_text_tokens(families)
  assert all(tok.unk_id not in tok_lib.encode_example(tok, e.question, e.answer, 32)['text'] for e in exs)
