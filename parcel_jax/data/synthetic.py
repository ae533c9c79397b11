"""Procedural visual QA that separates layout from fine detail.

Every example is a pure function of ``(split, index)``: no files, no global state.

Geometry at ``image_size = S`` (a multiple of 16; S = 64 by default):

* patch = S/16 px (the ViT patch; 4 px at S = 64),
* slot  = S/8 px = 2x2 patches (8 px) -- every object fills exactly one slot,
* cell  = S/4 px = 2x2 slots (16 px) -- the unit of positions in questions and
  answers, and exactly the footprint of one 4x4-pooled anchor.

Objects are solid coloured squares or *glyphs*: textures drawn as
``background +/- amplitude`` with exactly as many ``+`` as ``-`` pixels in the
slot. A glyph therefore never changes the mean colour of any aligned slot (8x8
block) or cell (16x16 block): pooled tokens see layout and colour, but cannot
tell glyph classes apart. That is the aliasing the ``detail`` and ``mixed``
families measure.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

FAMILIES: tuple[str, ...] = ('grounding', 'relation', 'detail', 'counting', 'mixed')

COLOURS: dict[str, tuple[float, float, float]] = {
    'red': (1.0, -1.0, -1.0),
    'green': (-1.0, 1.0, -1.0),
    'blue': (-1.0, -1.0, 1.0),
    'yellow': (1.0, 1.0, -1.0),
}
COUNT_WORDS: tuple[str, ...] = ('one', 'two', 'three', 'four')
RELATIONS: tuple[str, ...] = ('left', 'right', 'above', 'below')

SLOTS = 8  # slots per side
CELLS = 4  # cells per side
# Background channels stay within +/-BACKGROUND_MAX so that saturated squares
# contrast by >= 0.6 per channel and glyphs (+/-GLYPH_AMPLITUDE) never clip:
# clipping would break the exact mean preservation.
BACKGROUND_MAX = 0.4
GLYPH_AMPLITUDE = 0.55

_SPLIT_SEEDS = {'train': 20_240_601, 'eval': 31_415_926}


# ---------------------------------------------------------------------------
# Glyphs: +/-1 patterns on an s x s slot (s even), balanced for every even s.


def _glyph_hstripe(i, j, s):
  return (i % 2) == 0


def _glyph_vstripe(i, j, s):
  return (j % 2) == 0


def _glyph_checker(i, j, s):
  return ((i + j) % 2) == 0


def _glyph_diag(i, j, s):
  # (i - j) mod s runs over every residue once per row, so each row is balanced.
  return ((i - j) % s) < s // 2


def _glyph_quad(i, j, s):
  # Quadrant checkerboard: at S = 64 every patch is flat, only patch-to-patch
  # contrast inside the slot tells it apart from empty background.
  return ((2 * i // s + 2 * j // s) % 2) == 0


GLYPHS: dict[str, Callable[[np.ndarray, np.ndarray, int], np.ndarray]] = {
    'hstripe': _glyph_hstripe,
    'vstripe': _glyph_vstripe,
    'checker': _glyph_checker,
    'diag': _glyph_diag,
    'quad': _glyph_quad,
}


def glyph_pattern(name: str, slot_size: int) -> np.ndarray:
  """Returns the (slot_size, slot_size) float32 pattern of +/-1 for a glyph."""
  i, j = np.meshgrid(np.arange(slot_size), np.arange(slot_size), indexing='ij')
  return np.where(GLYPHS[name](i, j, slot_size), 1.0, -1.0).astype(np.float32)


# ---------------------------------------------------------------------------
# Layouts and rendering.


@dataclasses.dataclass(frozen=True)
class Item:
  """One object in one slot. ``label`` is a colour (square) or a glyph name."""

  kind: str  # 'square' | 'glyph'
  label: str
  row: int  # slot row, 0..7
  col: int  # slot column, 0..7
  polarity: int = 1  # glyphs only: +1 or -1 flips the texture's phase

  @property
  def cell(self) -> tuple[int, int]:
    return self.row // 2, self.col // 2


@dataclasses.dataclass(frozen=True)
class Layout:
  background: tuple[float, float, float]
  items: tuple[Item, ...]


@dataclasses.dataclass(frozen=True)
class Example:
  image: np.ndarray  # (S, S, 3) float32 in [-1, 1]
  question: str
  answer: str
  family: str
  layout: Layout
  split: str
  index: int


def _check_image_size(image_size: int) -> None:
  if image_size <= 0 or image_size % 16:
    raise ValueError(f'image_size must be a positive multiple of 16, got {image_size}')


def render(layout: Layout, image_size: int = 64) -> np.ndarray:
  """Draws a layout. Returns (image_size, image_size, 3) float32 in [-1, 1]."""
  _check_image_size(image_size)
  s = image_size // SLOTS
  margin = max(1, s // 8)  # keeps neighbouring squares visually separate
  bg = np.asarray(layout.background, np.float32)
  image = np.broadcast_to(bg, (image_size, image_size, 3)).copy()
  for item in layout.items:
    block = image[item.row * s:(item.row + 1) * s, item.col * s:(item.col + 1) * s]
    if item.kind == 'square':
      block[margin:s - margin, margin:s - margin] = COLOURS[item.label]
    elif item.kind == 'glyph':
      delta = item.polarity * GLYPH_AMPLITUDE * glyph_pattern(item.label, s)
      block[...] = bg + delta[..., None]
    else:
      raise ValueError(f'unknown item kind {item.kind!r}')
  return image


# ---------------------------------------------------------------------------
# Task families: each takes (rng, background) and returns (items, question, answer).


def _cell_words(row: int, col: int) -> str:
  return f'row{row + 1} col{col + 1}'


def _random_slots(rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
  flat = rng.choice(SLOTS * SLOTS, size=n, replace=False)
  return [(int(k) // SLOTS, int(k) % SLOTS) for k in flat]


def _other_colours(rng, exclude: Sequence[str], n: int) -> list[str]:
  pool = [c for c in COLOURS if c not in exclude]
  return [pool[k] for k in rng.integers(len(pool), size=n)]


def _squares(colours, slots) -> list[Item]:
  return [Item('square', c, r, k) for c, (r, k) in zip(colours, slots)]


def _glyph(rng, name: str, row: int, col: int) -> Item:
  return Item('glyph', name, row, col, polarity=int(rng.choice([-1, 1])))


def _grounding(rng):
  target = str(rng.choice(list(COLOURS)))
  distractors = _other_colours(rng, [target], int(rng.integers(1, 4)))
  slots = _random_slots(rng, 1 + len(distractors))
  items = _squares([target] + distractors, slots)
  return items, f'where is the {target} square', _cell_words(*items[0].cell)


def _relation(rng):
  subject, reference = (str(c) for c in rng.choice(list(COLOURS), 2, replace=False))
  # Unambiguous by construction: >= 2 slots apart on the dominant axis (so
  # different cells) and <= 1 slot apart on the other.
  while True:
    (r0, c0), (r1, c1) = _random_slots(rng, 2)
    dr, dc = r0 - r1, c0 - c1
    if abs(dc) >= 2 and abs(dr) <= 1:
      answer = 'left' if dc < 0 else 'right'
      break
    if abs(dr) >= 2 and abs(dc) <= 1:
      answer = 'above' if dr < 0 else 'below'
      break
  items = _squares([subject, reference], [(r0, c0), (r1, c1)])
  return items, f'where is the {subject} square relative to the {reference} square', answer


def _detail(rng):
  name = str(rng.choice(list(GLYPHS)))
  distractors = _other_colours(rng, [], int(rng.integers(0, 3)))
  (r, c), *slots = _random_slots(rng, 1 + len(distractors))
  items = [_glyph(rng, name, r, c)] + _squares(distractors, slots)
  return items, 'what pattern is shown', name


def _counting(rng):
  target = str(rng.choice(list(COLOURS)))
  count = int(rng.integers(1, 5))
  distractors = _other_colours(rng, [target], int(rng.integers(0, 4)))
  items = _squares([target] * count + distractors, _random_slots(rng, count + len(distractors)))
  return items, f'how many {target} squares', COUNT_WORDS[count - 1]


def _mixed(rng):
  count = int(rng.integers(2, 5))
  names = [str(n) for n in rng.choice(list(GLYPHS), count, replace=False)]
  cells = rng.choice(CELLS * CELLS, count, replace=False)
  items = []
  for name, cell in zip(names, cells):
    dr, dc = rng.integers(2, size=2)  # which slot of the cell
    items.append(_glyph(rng, name, 2 * (cell // CELLS) + dr, 2 * (cell % CELLS) + dc))
  asked = items[int(rng.integers(count))]
  return items, f'what pattern is in {_cell_words(*asked.cell)}', asked.label


_BUILDERS = {
    'grounding': _grounding,
    'relation': _relation,
    'detail': _detail,
    'counting': _counting,
    'mixed': _mixed,
}


def _check_families(families: Sequence[str] | None) -> tuple[str, ...]:
  """None or () means every family."""
  if not families:
    return FAMILIES
  families = tuple(families)
  unknown = [f for f in families if f not in FAMILIES]
  if unknown:
    raise ValueError(f'families must be a subset of {FAMILIES}, got {families}')
  return families


def family_probabilities(families: Sequence[str] | None,
                         weights: Sequence[float] | None) -> np.ndarray | None:
  """Normalised sampling weights over ``families`` (None or () = all), one per family in
  order; None when ``weights`` is empty or all equal (the uniform stream)."""
  if weights is None or len(weights) == 0:
    return None
  families = _check_families(families)
  w = np.asarray(weights, np.float64)
  if w.shape != (len(families),) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
    raise ValueError(f'family weights must be {len(families)} finite, non-negative numbers with a '
                     f'positive sum, one per family of {families}; got {tuple(weights)}')
  return None if np.all(w == w[0]) else w / w.sum()


def generate(split: str, index: int, image_size: int = 64,
             families: Sequence[str] | None = None,
             family_weights: Sequence[float] | None = None) -> Example:
  """Generates example ``index`` of ``split`` ('train' or 'eval').

  ``families`` restricts which families are sampled (None or () = all) and
  ``family_weights`` (one per family, None = uniform) skews the mixture; both
  change which example an index yields.
  """
  if split not in _SPLIT_SEEDS:
    raise ValueError(f'split must be one of {tuple(_SPLIT_SEEDS)}, got {split!r}')
  if index < 0:
    raise ValueError(f'index must be >= 0, got {index}')
  _check_image_size(image_size)
  probabilities = family_probabilities(families, family_weights)
  return _generate(split, index, image_size, _check_families(families), probabilities)


def _generate(split: str, index: int, image_size: int, families: tuple[str, ...],
              probabilities: np.ndarray | None) -> Example:
  """``generate`` on checked arguments (``SyntheticSource`` checks them once, not per example)."""
  rng = np.random.default_rng([_SPLIT_SEEDS[split], index])
  if probabilities is None:  # uniform: the stream that predates weights, draw for draw
    family = families[int(rng.integers(len(families)))]
  else:
    family = families[int(rng.choice(len(families), p=probabilities))]
  background = tuple(float(x) for x in rng.uniform(-BACKGROUND_MAX, BACKGROUND_MAX, 3))
  items, question, answer = _BUILDERS[family](rng)
  layout = Layout(background, tuple(items))
  return Example(render(layout, image_size), question, answer, family, layout, split, index)


# ---------------------------------------------------------------------------
# Vocabulary.


def answers(family: str) -> tuple[str, ...]:
  """Every answer ``family`` can produce."""
  cells = tuple(_cell_words(r, c) for r in range(CELLS) for c in range(CELLS))
  return {
      'grounding': cells,
      'relation': RELATIONS,
      'detail': tuple(GLYPHS),
      'counting': COUNT_WORDS,
      'mixed': tuple(GLYPHS),
  }[family]


def vocabulary() -> list[str]:
  """Every word a question or answer can use, in a fixed order (token ids depend on it)."""
  words = ['where', 'is', 'the', 'square', 'relative', 'to', 'what', 'pattern', 'shown',
           'in', 'how', 'many', 'squares', *COLOURS, *RELATIONS, *COUNT_WORDS, *GLYPHS]
  words += [f'row{k + 1}' for k in range(CELLS)] + [f'col{k + 1}' for k in range(CELLS)]
  return words


# Longest question ('where is the C square relative to the C square') and answer.
MAX_QUESTION_WORDS = 10
MAX_ANSWER_WORDS = 2


def max_text_tokens() -> int:
  """Upper bound on the tokens of one example laid out as BOS question SEP answer EOS."""
  return MAX_QUESTION_WORDS + MAX_ANSWER_WORDS + 3


# ---------------------------------------------------------------------------
# Grain random-access source.


class SyntheticSource:
  """Random-access source of ``num_examples`` examples of one split.

  ``source[i]`` -> dict(image (S, S, 3) float32, question str, answer str,
  family int32 index into FAMILIES, index int64).
  """

  def __init__(self, split: str, num_examples: int, image_size: int = 64,
               families: Sequence[str] | None = None,
               family_weights: Sequence[float] | None = None):
    if split not in _SPLIT_SEEDS:
      raise ValueError(f'split must be one of {tuple(_SPLIT_SEEDS)}, got {split!r}')
    if num_examples <= 0:
      raise ValueError(f'num_examples must be > 0, got {num_examples}')
    _check_image_size(image_size)
    self.split = split
    self.num_examples = int(num_examples)
    self.image_size = int(image_size)
    self.families = _check_families(families) if families else None
    self.family_weights = tuple(float(w) for w in family_weights) if family_weights else None
    # Checked and normalised here, once: bad weights fail now, not in a worker thread.
    self._sampled_families = _check_families(families)
    self._probabilities = family_probabilities(families, family_weights)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict:
    index = int(index)
    if not 0 <= index < self.num_examples:
      raise IndexError(f'index {index} out of range for {self!r}')
    ex = _generate(self.split, index, self.image_size, self._sampled_families, self._probabilities)
    return {
        'image': ex.image,
        'question': ex.question,
        'answer': ex.answer,
        'family': np.int32(FAMILIES.index(ex.family)),
        'index': np.int64(index),
    }

  def __repr__(self) -> str:
    return (f'SyntheticSource(split={self.split!r}, num_examples={self.num_examples}, '
            f'image_size={self.image_size}, families={self.families}, '
            f'family_weights={self.family_weights})')
