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
families measure at the pixel level.

Pixel-level aliasing is not enough once a ViT sits in front of the pooling: its features
are nonlinear, so the mean of a cell's features still says *which* glyph classes are in the
cell (``detail``'s single glyph survives 4x4 pooling). The fine families ask what only the
arrangement of many symbols inside a cell answers, more than one pooled token can be made to
carry:

* ``fine_detail``: a *page* -- the cell at ``PAGE_CELL`` filled with 4x4 *symbols*, glyphs
  one ViT patch in size (16 symbols, one per patch, classes drawn independently).
  The question names one symbol by its line and place (``what pattern is at line2 char3``).
  Every symbol is balanced inside its patch, so every arrangement of the page has the same
  mean in every patch, every 2x2-patch block (M3 at 64 tokens) and the cell (M3 at 16): only
  tokens that keep single patches see which symbol is where.
* ``reading``: the same page, read a line at a time (``read line2`` -> ``checker diag quad
  diag``): a text line whose characters are smaller than any pooled region, as in a document.
* ``fine_grounding``: the answer is a slot on the 8x8 slot grid, finer than the 4x4 anchor
  grid, in PaliGemma's coordinate style (``where exactly is the red square`` -> ``y3 x6``); a
  square's cell mean is the same in any slot of its cell.

The page sits at one fixed cell on purpose: the question addresses a symbol by position, and
a fixed page keeps that address a function of the question alone, so the uncompressed model
learns it in minutes on a CPU; pooling loses the page's arrangement wherever the page is.
Positions elsewhere are cells (``row1 col1`` .. ``row4 col4``).

Temporal families (opt-in by name; ``data.max_frames`` >= ``CLIP_FRAMES``): the example is a
clip of ``CLIP_FRAMES`` frames on one background, ``image`` (T, S, S, 3), and no single frame
answers the question:

* ``appearance``: the target square is in exactly one frame, distractor squares of other
  colours in every frame (``in which frame is the red square`` -> ``frame3``).
* ``motion``: the target square moves one slot per frame in one direction, a distractor
  stays put (``which way does the red square move`` -> ``left`` / ``right`` / ``up`` /
  ``down``).
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Sequence

import numpy as np

# Every family, in a fixed order (the ``family`` index of a record points into it). New
# families are appended so that indices, and the token ids of the vocabulary, stay stable.
FAMILIES: tuple[str, ...] = ('grounding', 'relation', 'detail', 'counting', 'mixed',
                             'fine_grounding', 'fine_detail', 'reading', 'appearance', 'motion')
# What ``families=()`` samples: the original mixture (the fine families are opt-in by name).
DEFAULT_FAMILIES: tuple[str, ...] = FAMILIES[:5]
# The families whose answers need more than one 4x4-pooled anchor can hold (see the module
# docstring): the mixture that separates pooling from content-aware resampling.
FINE_FAMILIES: tuple[str, ...] = ('fine_grounding', 'relation', 'fine_detail', 'reading', 'counting')
# The families whose example is a clip of CLIP_FRAMES frames (image (T, S, S, 3)).
TEMPORAL_FAMILIES: tuple[str, ...] = ('appearance', 'motion')
CLIP_FRAMES = 4
# Direction word -> (slot rows, slot columns) moved per frame.
MOTIONS: dict[str, tuple[int, int]] = {'left': (0, -1), 'right': (0, 1), 'up': (-1, 0), 'down': (1, 0)}

COLOURS: dict[str, tuple[float, float, float]] = {
    'red': (1.0, -1.0, -1.0),
    'green': (-1.0, 1.0, -1.0),
    'blue': (-1.0, -1.0, 1.0),
    'yellow': (1.0, 1.0, -1.0),
}
COUNT_WORDS: tuple[str, ...] = ('one', 'two', 'three', 'four')
RELATIONS: tuple[str, ...] = ('left', 'right', 'above', 'below')

PATCHES = 16  # ViT patches per side (the paper's 16x16 feature grid)
SLOTS = 8  # slots per side
CELLS = 4  # cells per side
PAGE_CELL = (1, 1)  # the fine families' page: the cell at row2 col2
PAGE_SIDE = PATCHES // CELLS  # symbols per line and lines per page (4)
# Symbols need >= 4 px: at 2 px diag and quad would both be the checkerboard.
MIN_SYMBOL_PX = 4
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

  kind: str  # 'square' | 'glyph' (one slot) | 'symbol' (a glyph one patch in size)
  label: str
  row: int  # slot row, 0..7 (symbols: patch row, 0..15)
  col: int  # slot column, 0..7 (symbols: patch column, 0..15)
  polarity: int = 1  # glyphs and symbols: +1 or -1 flips the texture's phase

  @property
  def cell(self) -> tuple[int, int]:
    per_cell = PATCHES // CELLS if self.kind == 'symbol' else SLOTS // CELLS
    return self.row // per_cell, self.col // per_cell


@dataclasses.dataclass(frozen=True)
class Layout:
  background: tuple[float, float, float]
  items: tuple[Item, ...]


@dataclasses.dataclass(frozen=True)
class Example:
  image: np.ndarray  # (S, S, 3) float32 in [-1, 1]; a temporal family: (T, S, S, 3)
  question: str
  answer: str
  family: str
  layout: Layout  # a temporal family: the first frame's
  split: str
  index: int
  frame_layouts: tuple[Layout, ...] = ()  # a temporal family: every frame's, in order


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
  p = image_size // PATCHES
  for item in layout.items:
    if item.kind == 'symbol':
      if p < MIN_SYMBOL_PX:
        raise ValueError(f'symbols need image_size >= {PATCHES * MIN_SYMBOL_PX} '
                         f'({MIN_SYMBOL_PX} px per patch), got {image_size}')
      block = image[item.row * p:(item.row + 1) * p, item.col * p:(item.col + 1) * p]
      block[...] = bg + (item.polarity * GLYPH_AMPLITUDE * glyph_pattern(item.label, p))[..., None]
      continue
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


def _coord_words(row: int, col: int) -> str:
  """A cell's position: 'row2 col3' (1-based)."""
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
  return items, f'where is the {target} square', _coord_words(*items[0].cell)


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
  return items, f'what pattern is in {_coord_words(*asked.cell)}', asked.label


def _page(rng) -> list[Item]:
  """The fine families' page: PAGE_SIDE x PAGE_SIDE symbols filling PAGE_CELL, row-major,
  plus 0-2 squares in other cells as distractors."""
  r0, c0 = (PAGE_SIDE * k for k in PAGE_CELL)
  names = rng.choice(list(GLYPHS), PAGE_SIDE * PAGE_SIDE)
  # One phase for every symbol: a symbol's class is then a linear function of its patch (what
  # a patch embedding reads), and the phase would not change any pooled mean anyway.
  items = [Item('symbol', str(name), r0 + k // PAGE_SIDE, c0 + k % PAGE_SIDE)
           for k, name in enumerate(names)]
  free = [(r, c) for r in range(SLOTS) for c in range(SLOTS) if (r // 2, c // 2) != PAGE_CELL]
  picks = rng.choice(len(free), int(rng.integers(0, 3)), replace=False)
  return items + _squares(_other_colours(rng, [], len(picks)), [free[int(k)] for k in picks])


def _fine_detail(rng):
  items = _page(rng)
  line, char = (int(k) for k in rng.integers(PAGE_SIDE, size=2))
  asked = items[line * PAGE_SIDE + char]
  return items, f'what pattern is at line{line + 1} char{char + 1}', asked.label


def _reading(rng):
  items = _page(rng)
  line = int(rng.integers(PAGE_SIDE))
  code = items[line * PAGE_SIDE:(line + 1) * PAGE_SIDE]
  return items, f'read line{line + 1}', ' '.join(it.label for it in code)


def _slot_words(row: int, col: int) -> str:
  """A slot on the 8x8 grid, PaliGemma-style y before x: 'y3 x6' (1-based)."""
  return f'y{row + 1} x{col + 1}'


def _fine_grounding(rng):
  target = str(rng.choice(list(COLOURS)))
  distractors = _other_colours(rng, [target], int(rng.integers(1, 4)))
  slots = _random_slots(rng, 1 + len(distractors))
  items = _squares([target] + distractors, slots)
  return items, f'where exactly is the {target} square', _slot_words(items[0].row, items[0].col)


def _frame_words(frame: int) -> str:
  return f'frame{frame + 1}'


def _appearance(rng):
  """-> (items per frame, question, answer): the target in one frame, 1-2 distractors of
  other colours in every frame (so every frame has squares)."""
  target = str(rng.choice(list(COLOURS)))
  shown = int(rng.integers(CLIP_FRAMES))
  frames = []
  for t in range(CLIP_FRAMES):
    distractors = _other_colours(rng, [target], int(rng.integers(1, 3)))
    colours = [target] * (t == shown) + distractors
    frames.append(_squares(colours, _random_slots(rng, len(colours))))
  return frames, f'in which frame is the {target} square', _frame_words(shown)


def _motion(rng):
  """-> (items per frame, question, answer): the target moves one slot per frame along one
  direction, staying on the grid; a distractor of another colour stays put off its path."""
  subject, other = (str(c) for c in rng.choice(list(COLOURS), 2, replace=False))
  direction = str(rng.choice(list(MOTIONS)))
  dr, dc = MOTIONS[direction]
  span = CLIP_FRAMES - 1
  rows = range(max(0, -dr * span), SLOTS - max(0, dr * span))
  cols = range(max(0, -dc * span), SLOTS - max(0, dc * span))
  r0, c0 = int(rng.choice(rows)), int(rng.choice(cols))
  path = [(r0 + dr * t, c0 + dc * t) for t in range(CLIP_FRAMES)]
  free = [(r, c) for r in range(SLOTS) for c in range(SLOTS) if (r, c) not in path]
  still = free[int(rng.integers(len(free)))]
  frames = [_squares([subject, other], [path[t], still]) for t in range(CLIP_FRAMES)]
  return frames, f'which way does the {subject} square move', direction


_BUILDERS = {
    'grounding': _grounding,
    'relation': _relation,
    'detail': _detail,
    'counting': _counting,
    'mixed': _mixed,
    'fine_grounding': _fine_grounding,
    'fine_detail': _fine_detail,
    'reading': _reading,
    'appearance': _appearance,
    'motion': _motion,
}


def max_frames(families: Sequence[str] | None = None) -> int:
  """Frames of the longest example of ``families`` (None or () = the default mixture)."""
  return CLIP_FRAMES if set(check_families(families)) & set(TEMPORAL_FAMILIES) else 1


def check_families(families: Sequence[str] | None) -> tuple[str, ...]:
  """The families to sample, checked: None or () means the default mixture
  (``DEFAULT_FAMILIES``); comma-separated entries are split (a command-line
  ``--config.data.families=fine_detail,reading`` arrives as one string)."""
  families = tuple(f.strip() for item in (families or ()) for f in str(item).split(',') if f.strip())
  if not families:
    return DEFAULT_FAMILIES
  unknown = [f for f in families if f not in FAMILIES]
  if unknown:
    raise ValueError(f'families must be a subset of {FAMILIES}, got {families}')
  return families


def family_probabilities(families: Sequence[str] | None,
                         weights: Sequence[float] | None) -> np.ndarray | None:
  """Normalised sampling weights over ``families`` (None or () = the default mixture), one per family in
  order; None when ``weights`` is empty or all equal (the uniform stream)."""
  if weights is None or len(weights) == 0:
    return None
  families = check_families(families)
  w = np.asarray(weights, np.float64)
  if w.shape != (len(families),) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
    raise ValueError(f'family weights must be {len(families)} finite, non-negative numbers with a '
                     f'positive sum, one per family of {families}; got {tuple(weights)}')
  return None if np.all(w == w[0]) else w / w.sum()


def generate(split: str, index: int, image_size: int = 64,
             families: Sequence[str] | None = None,
             family_weights: Sequence[float] | None = None) -> Example:
  """Generates example ``index`` of ``split`` ('train' or 'eval').

  ``families`` restricts which families are sampled (None or () = ``DEFAULT_FAMILIES``) and
  ``family_weights`` (one per family, None = uniform) skews the mixture; both
  change which example an index yields.
  """
  if split not in _SPLIT_SEEDS:
    raise ValueError(f'split must be one of {tuple(_SPLIT_SEEDS)}, got {split!r}')
  if index < 0:
    raise ValueError(f'index must be >= 0, got {index}')
  _check_image_size(image_size)
  probabilities = family_probabilities(families, family_weights)
  return _generate(split, index, image_size, check_families(families), probabilities)


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
  if family in TEMPORAL_FAMILIES:  # a clip: one layout per frame, one background
    layouts = tuple(Layout(background, tuple(frame)) for frame in items)
    clip = np.stack([render(layout, image_size) for layout in layouts])
    return Example(clip, question, answer, family, layouts[0], split, index, layouts)
  layout = Layout(background, tuple(items))
  return Example(render(layout, image_size), question, answer, family, layout, split, index)


# ---------------------------------------------------------------------------
# Vocabulary.


def answers(family: str) -> tuple[str, ...]:
  """Every answer ``family`` can produce (``reading``: the 5**4 lines)."""
  cells = tuple(_coord_words(r, c) for r in range(CELLS) for c in range(CELLS))
  slots = tuple(_slot_words(r, c) for r in range(SLOTS) for c in range(SLOTS))
  if family == 'reading':
    return tuple(' '.join(code) for code in itertools.product(GLYPHS, repeat=PAGE_SIDE))
  return {
      'grounding': cells,
      'relation': RELATIONS,
      'detail': tuple(GLYPHS),
      'counting': COUNT_WORDS,
      'mixed': tuple(GLYPHS),
      'fine_grounding': slots,
      'fine_detail': tuple(GLYPHS),
      'appearance': tuple(_frame_words(t) for t in range(CLIP_FRAMES)),
      'motion': tuple(MOTIONS),
  }[family]


def vocabulary(families: Sequence[str] | None = None) -> list[str]:
  """Every word a question or answer of ``families`` (None or () = the default mixture) can
  use, in a fixed order (token ids depend on it). The fine families' words are appended only
  when one of them is sampled, so the default mixture's vocabulary and ids stay as they were."""
  words = ['where', 'is', 'the', 'square', 'relative', 'to', 'what', 'pattern', 'shown',
           'in', 'how', 'many', 'squares', *COLOURS, *RELATIONS, *COUNT_WORDS, *GLYPHS]
  words += [f'row{k + 1}' for k in range(CELLS)] + [f'col{k + 1}' for k in range(CELLS)]
  if set(check_families(families)) <= set(DEFAULT_FAMILIES):
    return words
  words += ['exactly', 'read', 'at', *(f'line{k + 1}' for k in range(PAGE_SIDE)),
            *(f'char{k + 1}' for k in range(PAGE_SIDE)),
            *(f'y{k + 1}' for k in range(SLOTS)), *(f'x{k + 1}' for k in range(SLOTS))]
  if set(check_families(families)) & set(TEMPORAL_FAMILIES):  # after the fine words: their ids stay
    words += ['which', 'frame', 'way', 'does', 'move', 'up', 'down',
              *(_frame_words(t) for t in range(CLIP_FRAMES))]
  return words


# Longest question and answer of each family, in words.
TEXT_WORDS: dict[str, tuple[int, int]] = {
    'grounding': (5, 2), 'relation': (10, 1), 'detail': (4, 1), 'counting': (4, 1),
    'mixed': (6, 1), 'fine_grounding': (6, 2), 'fine_detail': (6, 1), 'reading': (2, PAGE_SIDE),
    'appearance': (7, 1), 'motion': (7, 1),
}
MAX_QUESTION_WORDS = max(q for q, _ in TEXT_WORDS.values())
MAX_ANSWER_WORDS = max(a for _, a in TEXT_WORDS.values())


def max_text_tokens(families: Sequence[str] | None = None) -> int:
  """Tokens of the longest example of ``families`` (None or () = the default mixture) laid
  out as BOS question SEP answer EOS."""
  return max(sum(TEXT_WORDS[f]) for f in check_families(families)) + 3


# ---------------------------------------------------------------------------
# Grain random-access source.


class SyntheticSource:
  """Random-access source of ``num_examples`` examples of one split.

  ``source[i]`` -> dict(image (S, S, 3) float32 (a temporal family: (CLIP_FRAMES, S, S, 3)),
  question str, answer str, family int32 index into FAMILIES, index int64).
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
    self.families = check_families(families) if families else None
    self.family_weights = tuple(float(w) for w in family_weights) if family_weights else None
    # Checked and normalised here, once: bad weights fail now, not in a worker thread.
    self._sampled_families = check_families(families)
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
