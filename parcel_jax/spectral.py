"""Spectral concentration of visual tokens (paper, Appendix A).

Claim under test: pooled anchors carry the low spatial frequencies of the ViT feature grid
and the learned queries fetch the rest. Every grid is analysed at its native resolution
(never upsampled), so a 4x4 anchor grid only has rings r = 0..2 and a 16x16 grid r = 0..8;
curves are compared on the fraction-of-Nyquist axis r / r_max.

Pipeline for a grid M (H, W, C):
  power_spectrum   subtract the per-channel spatial mean, F = DFT2(M) / (H W),
                   P = |F|^2 averaged over channels, fftshift (DC at (H//2, W//2)).
                   Parseval for this normalisation: sum_{u,v} |F_c|^2 = mean_{x,y} (M_c - mean M_c)^2,
                   so sum(P) is the per-channel spatial variance averaged over channels.
  radial_profile   mean power in unit-width rings r - 1/2 <= rho < r + 1/2, r = 0..min(H, W)//2.
                   A mean, not a sum: outer rings hold more frequencies, a sum would favour them.
  concentration_curve  average profiles over a data set, normalise rings 1..r_max (DC excluded),
                   cumulative sum (ends at 1). Low-pass tokens rise early.
Query tokens have no grid of their own: ``query_footprint_spectrum`` uses each query's
attention over the source grid as a spatial weighting of that grid.

All functions are pure numpy, float64.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

EPS = 1e-15  # the paper's epsilon in the ring normalisation


def _power(grids: np.ndarray) -> np.ndarray:
  """(..., H, W, C) -> (..., H, W) channel-averaged, shifted, 1/(HW)-normalised power."""
  x = np.asarray(grids, np.float64)
  h, w = x.shape[-3:-1]
  x = x - x.mean(axis=(-3, -2), keepdims=True)  # per-channel spatial mean: DC carries no layout
  f = np.fft.fft2(x, axes=(-3, -2)) / (h * w)
  p = (np.abs(f) ** 2).mean(axis=-1)
  return np.fft.fftshift(p, axes=(-2, -1))


def power_spectrum(grid: np.ndarray) -> np.ndarray:
  """(H, W, C) feature grid -> (H, W) power spectrum, DC at (H//2, W//2) (see module doc)."""
  grid = np.asarray(grid)
  if grid.ndim != 3:
    raise ValueError(f"expected a (H, W, C) grid, got shape {grid.shape}")
  return _power(grid)


def ring_index(shape: tuple[int, int]) -> np.ndarray:
  """(H, W) int ring number round(rho) of every frequency of a shifted spectrum.

  rho = sqrt(u^2 + v^2) in integer frequency units from the shifted centre; ring r holds
  r - 1/2 <= rho < r + 1/2 (rho is never exactly a half-integer, so rounding is unambiguous).
  """
  h, w = shape
  u = np.arange(h) - h // 2
  v = np.arange(w) - w // 2
  rho = np.sqrt(u[:, None] ** 2 + v[None, :] ** 2)
  return np.floor(rho + 0.5).astype(np.int64)


def radial_profile(power: np.ndarray) -> np.ndarray:
  """(H, W) shifted power -> (r_max + 1,) mean power per ring, r_max = min(H, W) // 2.

  Frequencies beyond the inscribed Nyquist radius (the corners) are dropped. Every ring
  up to r_max is non-empty: it contains (r, 0) at least.
  """
  power = np.asarray(power, np.float64)
  r_max = min(power.shape) // 2
  rings = ring_index(power.shape).ravel()
  keep = rings <= r_max
  sums = np.bincount(rings[keep], weights=power.ravel()[keep], minlength=r_max + 1)
  counts = np.bincount(rings[keep], minlength=r_max + 1)
  return sums / counts


def grid_profile(grid: np.ndarray) -> np.ndarray:
  """(H, W, C) -> (min(H, W)//2 + 1,) radial profile of a native grid (anchors, M3, ViT)."""
  return radial_profile(power_spectrum(grid))


def concentration_curve(profiles: Sequence[np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
  """Spectral concentration curve of a data set of radial profiles.

  Args:
    profiles: (n, r_max + 1) or a list of n profiles of one grid size.

  Returns:
    ``radius`` (r_max,) rings 1..r_max; ``nyquist_fraction`` (r_max,) r / r_max;
    ``profile`` (r_max,) the data-set mean profile normalised to sum 1 over rings 1..r_max;
    ``curve`` (r_max,) its cumulative sum, monotone, ending at 1 (up to EPS);
    ``mean_profile`` (r_max + 1,) the unnormalised mean, DC included.
  """
  p = np.asarray(profiles, np.float64)
  if p.ndim == 1:
    p = p[None]
  if p.ndim != 2 or p.shape[1] < 2:
    raise ValueError(f"expected profiles of shape (n, r_max + 1) with r_max >= 1, got {p.shape}")
  mean = p.mean(axis=0)
  ac = mean[1:]  # DC excluded: the mean was subtracted, and it is not a spatial frequency
  normalised = ac / (ac.sum() + EPS)
  r_max = ac.shape[0]
  radius = np.arange(1, r_max + 1)
  return {
      "radius": radius,
      "nyquist_fraction": radius / r_max,
      "profile": normalised,
      "curve": np.cumsum(normalised),
      "mean_profile": mean,
  }


def query_footprint_spectrum(attn: np.ndarray, grid: np.ndarray, chunk: int = 32) -> np.ndarray:
  """Radial profile of what the queries fetch from a source grid.

  Args:
    attn: (Q, S) head-averaged post-softmax attention of Q queries over S = H*W source
      tokens in raster order.
    grid: (H, W, C) the source feature grid (the ViT output).
    chunk: queries per batch (bounds memory at chunk*H*W*C floats).

  Returns:
    (min(H, W)//2 + 1,) radial profile of the query-averaged power of the weighted grids
    grid * a_q, with a_q each query's attention rescaled to unit spatial mean (so uniform
    attention reproduces the plain grid spectrum).
  """
  attn = np.asarray(attn, np.float64)
  grid = np.asarray(grid, np.float64)
  h, w, _ = grid.shape
  if attn.ndim != 2 or attn.shape[1] != h * w:
    raise ValueError(f"attention {attn.shape} does not cover a {h}x{w} source grid")
  weights = attn / np.maximum(attn.mean(axis=1, keepdims=True), EPS)  # unit spatial mean
  total = np.zeros((h, w))
  for start in range(0, attn.shape[0], chunk):
    a = weights[start:start + chunk].reshape(-1, h, w, 1)
    total += _power(a * grid).sum(axis=0)
  return radial_profile(total / attn.shape[0])


def pool_grid(grid: np.ndarray, out: int) -> np.ndarray:
  """(H, W, C) -> (out, out, C) average pooling with kernel (H/out, W/out); never upsamples."""
  grid = np.asarray(grid)
  h, w, c = grid.shape
  if out < 1 or h % out or w % out:
    raise ValueError(f"cannot average-pool a {h}x{w} grid to {out}x{out}: need a divisor of both")
  return grid.reshape(out, h // out, out, w // out, c).mean(axis=(1, 3))


def plot_curves(curves: Mapping[str, np.ndarray | Mapping[str, np.ndarray]], path: str,
                title: str = "Spectral concentration") -> None:
  """Writes concentration curves against r / r_max to ``path`` (PNG).

  ``curves`` maps a label to a ``concentration_curve`` dict or a bare (r_max,) curve.
  """
  import matplotlib
  matplotlib.use("Agg")  # headless: no display on training hosts
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5, 4))
  for name, c in curves.items():
    y = np.asarray(c["curve"] if isinstance(c, Mapping) else c)
    x = np.arange(1, len(y) + 1) / len(y)
    ax.plot(np.concatenate([[0.0], x]), np.concatenate([[0.0], y]), marker="o", label=name)
  ax.set_xlabel("radial frequency r / r_max (fraction of Nyquist)")
  ax.set_ylabel("cumulative fraction of AC power")
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend()
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
