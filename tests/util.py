"""Shared test helpers."""

import numpy as np


def assert_rel_close(actual, expected, tol=1e-5):
  """Relative error in the Frobenius norm: ||a - e|| <= tol * ||e||.

  Element-wise rtol is meaningless on near-zero entries of float32 activations
  computed with different shapes (XLA tiles the reductions differently)."""
  a = np.asarray(actual, np.float64)
  e = np.asarray(expected, np.float64)
  assert a.shape == e.shape, (a.shape, e.shape)
  err = np.linalg.norm(a - e)
  scale = max(np.linalg.norm(e), 1e-12)
  assert err <= tol * scale, f"relative error {err / scale:.3e} > {tol:.1e}"
