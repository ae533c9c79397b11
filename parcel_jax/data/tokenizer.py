"""Word-level tokenizer and the prefix-LM text layout (PaliGemma convention).

Layout of one example, length ``max_len``::

  text       BOS q1 .. qn SEP a1 .. am EOS PAD ..
  ar_mask     F  F  ..  F  F  T  ..  T  T   F  ..   prefix attends fully, suffix causally
  loss_mask   F  F  ..  F  T  T  ..  T  F   F  ..   positions whose *target* is a1..am or EOS
  targets    text shifted left by one (PAD at the end)

(``prefix_lm_arrays``' ``suffix_targets`` leaves parts of the suffix unsupervised: the later
prompts of a multi-turn conversation, ``gemma_tokenizer.layout_example``.)
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


def encode_example(tokenizer: WordTokenizer, question: str, answer: str,
                   max_len: int) -> dict[str, np.ndarray]:
  """Lays out one (question, answer) pair; every array has shape (max_len,).

  Returns ``text``/``targets`` int32 and ``text_mask``/``ar_mask``/``loss_mask``
  bool. Raises ValueError if the example needs more than ``max_len`` tokens.
  """
  q, a = tokenizer.encode(question), tokenizer.encode(answer)
  n = len(q) + len(a) + 3
  if n > max_len:
    raise ValueError(f'example needs {n} tokens (question {len(q)} + answer {len(a)} + 3 '
                     f'specials) but max_len is {max_len}: {question!r} -> {answer!r}')
  # The suffix starts at the first answer token (or EOS if the answer is empty).
  return prefix_lm_arrays([tokenizer.bos_id, *q, tokenizer.sep_id], [*a, tokenizer.eos_id],
                          max_len, tokenizer.pad_id)


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
