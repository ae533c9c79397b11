"""FLOPs of the blocks the paper's cost model (Appendix C) is made of.

One multiply-add = 2 FLOPs; norms, activations, softmax and biases are omitted, as in the
paper. ``flops.py`` adds them up for a whole model; each connector method adds up its own
(``models/connectors``), so both use these and neither repeats a formula.
"""

from __future__ import annotations


def self_attention_flops(n: int, d: int) -> int:
  """n tokens attending to each other at width d: Q,K,V,O projections + scores + weighted sum."""
  return 8 * n * d * d + 4 * n * n * d


def cross_attention_flops(n_query: int, n_source: int, d: int) -> int:
  """n_query tokens attending to n_source tokens: Q,O on queries, K,V on sources, scores + sum."""
  return 4 * (n_query + n_source) * d * d + 4 * n_query * n_source * d


def mlp_flops(n: int, d: int, hidden: int) -> int:
  """A two-matrix MLP d -> hidden -> d on n tokens."""
  return 4 * n * d * hidden
