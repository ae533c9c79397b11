"""Word-level tokenizer and the prefix-LM text layout (PaliGemma convention).

Layout of one example, length ``max_len``::

  text       BOS q1 .. qn SEP a1 .. am EOS PAD ..
  ar_mask     F  F  ..  F  F  T  ..  T  T   F  ..   prefix attends fully, suffix causally
  loss_mask   F  F  ..  F  T  T  ..  T  F   F  ..   positions whose *target* is a1..am or EOS
  targets    text shifted left by one (PAD at the end)

(``prefix_lm_arrays``' ``suffix_targets`` leaves parts of the suffix unsupervised: the later
prompts of a multi-turn conversation, ``layout_example``; every source, synthetic or real, is
laid out by it.)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from parcel_jax.data import synthetic

SPECIALS: tuple[str, ...] = ('<pad>', '<bos>', '<eos>', '<sep>', '<unk>')


def ids_before_eos(ids: Sequence[int], eos_id: int, skip: Sequence[int] = ()) -> list[int]:
  """The ids up to (not including) the first ``eos_id``, without those in ``skip``:
  what every tokenizer's ``decode`` turns into text."""
  out = []
  for i in ids:
    i = int(i)
    if i == eos_id:
      break
    if i not in skip:
      out.append(i)
  return out


class WordTokenizer:
  """Whitespace tokenizer over a fixed word list; specials take ids 0..4."""

  pad_id, bos_id, eos_id, sep_id, unk_id = range(len(SPECIALS))

  def __init__(self, words: Sequence[str]):
    words = list(dict.fromkeys(words))  # dedupe, keep order: ids must be stable
    clash = set(words) & set(SPECIALS)
    if clash:
      raise ValueError(f'words collide with special tokens: {sorted(clash)}')
    self._id_to_word = list(SPECIALS) + words
    self._word_to_id = {w: i for i, w in enumerate(self._id_to_word)}

  @property
  def vocab_size(self) -> int:
    return len(self._id_to_word)

  def encode(self, text: str) -> list[int]:
    return [self._word_to_id.get(w, self.unk_id) for w in text.split()]

  def decode(self, ids: Sequence[int]) -> str:
    """Joins words up to the first EOS, skipping PAD and BOS."""
    words = [self._id_to_word[i] if 0 <= i < self.vocab_size else '<unk>'
             for i in ids_before_eos(ids, self.eos_id, skip=(self.pad_id, self.bos_id))]
    return ' '.join(words)

  def __repr__(self) -> str:
    return f'WordTokenizer(vocab_size={self.vocab_size})'


def synthetic_tokenizer(families=()) -> WordTokenizer:
  """The word list of the synthetic ``families`` (() = the default mixture)."""
  return WordTokenizer(synthetic.vocabulary(families))


def encode_example(tokenizer, question: str, answer: str, max_len: int) -> dict[str, np.ndarray]:
  """``layout_example`` of one (question, answer) pair (no truncation): ``text``/``targets``
  int32 and ``text_mask``/``ar_mask``/``loss_mask`` bool, each of shape (max_len,).
  Raises TextTooLong (a ValueError) if the example needs more than ``max_len`` tokens."""
  return layout_example(tokenizer, question, answer, max_len, 'reject')[0]


def _sep_ids(tokenizer) -> list[int]:
  return list(getattr(tokenizer, 'sep_ids', None) or [tokenizer.sep_id])


def prompt_ids(tokenizer, prefix: str) -> list[int]:
  """``[BOS, prefix..., SEP]``: the prompt as training lays it out, and as serving feeds it."""
  return [tokenizer.bos_id, *tokenizer.encode(prefix), *_sep_ids(tokenizer)]


LONG_TEXT_POLICIES = ('truncate', 'reject')


class TextTooLong(ValueError):
  """An example does not fit ``max_len`` (even truncated, under 'truncate')."""


def layout_example(tokenizer, prefix: str, suffix: str, max_len: int,
                   long_text: str = "reject",
                   turns: Sequence[tuple[str, str]] = ()) -> tuple[dict[str, np.ndarray], bool]:
  """PaliGemma prefix-LM layout of one (prefix, suffix) pair, and of the later (prompt, answer)
  exchanges ``turns`` of a multi-turn conversation; arrays of shape (max_len,).

  Later exchanges continue the suffix, each as ``prompt.. "\\n" answer.. <eos>``: they are
  causal (ar_mask True) like the first answer, only the prefix (and the image) is
  bidirectional; the loss covers every answer and its EOS, not the later prompts. (An EOS
  ends every answer, so each turn stops where a decoded answer stops.)

  ``long_text='truncate'``: whole trailing exchanges are dropped until the rest fits; if the
  first alone does not fit, its suffix is cut (then EOS) from the end, keeping the whole
  prefix and at least one suffix token. 'reject' raises TextTooLong. Returns the arrays
  and whether the example was truncated. Works for any tokenizer with ``encode``,
  ``bos_id``, ``eos_id``, ``pad_id`` and ``sep_ids`` (or ``sep_id``).
  """
  if long_text not in LONG_TEXT_POLICIES:
    raise ValueError(f"data.long_text={long_text!r} is unknown; allowed: {', '.join(LONG_TEXT_POLICIES)}")
  sep = _sep_ids(tokenizer)
  head = prompt_ids(tokenizer, prefix)
  tail = [*tokenizer.encode(suffix), tokenizer.eos_id]
  later = [([*tokenizer.encode(p), *sep], [*tokenizer.encode(a), tokenizer.eos_id]) for p, a in turns]
  n = len(head) + len(tail) + sum(len(p) + len(a) for p, a in later)
  truncated = False
  if n > max_len:
    if long_text == "reject" or len(head) + 1 > max_len:
      more = f", {len(later)} later exchanges {n - len(head) - len(tail)}" if later else ""
      raise TextTooLong(f"needs {n} tokens (prefix {len(head)} with BOS and separator, suffix "
                        f"{len(tail)} with EOS{more}) but data.max_text_len is {max_len}"
                        + ("" if long_text == "reject" else "; the prefix alone does not fit"))
    truncated, used, kept = True, len(head) + len(tail), []
    for p, a in later:
      if used + len(p) + len(a) > max_len:
        break
      kept.append((p, a))
      used += len(p) + len(a)
    later, tail = kept, tail[:max_len - len(head)]
  targets = [True] * len(tail)
  for p, a in later:
    tail += p + a
    targets += [False] * len(p) + [True] * len(a)
  return prefix_lm_arrays(head, tail, max_len, tokenizer.pad_id, targets), truncated


def prefix_lm_arrays(prefix_ids: Sequence[int], suffix_ids: Sequence[int], max_len: int,
                     pad_id: int, suffix_targets: Sequence[bool] | None = None) -> dict[str, np.ndarray]:
  """The layout in the module docstring for ``prefix_ids`` (BOS .. SEP) followed by
  ``suffix_ids`` (.. EOS), which together fit in ``max_len``; arrays of shape (max_len,).

  ``suffix_targets`` (one bool per suffix id; default all True) marks the suffix ids that
  are supervised: ``loss_mask`` is True where the *target* is one of them. A multi-turn
  conversation puts its later prompts in the suffix (causal) with their targets False.
  """
  n, start = len(prefix_ids) + len(suffix_ids), len(prefix_ids)
  text = np.full(max_len, pad_id, np.int32)
  text[:n] = [*prefix_ids, *suffix_ids]
  pos = np.arange(max_len)
  supervised = np.zeros(max_len + 1, bool)  # by the position of the target token
  if suffix_targets is None:
    supervised[start:n] = True
  else:
    if len(suffix_targets) != len(suffix_ids):
      raise ValueError(f'suffix_targets has {len(suffix_targets)} entries for {len(suffix_ids)} suffix ids')
    supervised[start:n] = np.asarray(suffix_targets, bool)
  return {
      'text': text,
      'text_mask': pos < n,
      'ar_mask': (pos >= start) & (pos < n),
      'targets': np.append(text[1:], np.int32(pad_id)),
      'loss_mask': supervised[1:],
  }
