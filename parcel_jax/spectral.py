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

All functions are pure numpy, float64, except the CLI section at the end, which runs a
checkpoint (JAX) on the eval stream:

    python -m parcel_jax.spectral --workdir=RUN --budget=B --out=DIR [--num_images=N]

writes ``DIR/spectral_B.json`` and the plots ``DIR/concentration_B.png`` (cumulative curves)
and ``DIR/profiles_B.png`` (normalised ring power) for: the source ViT grid (after its
final norm), the anchors of budget B (their pooled native grid), M3-style pooled grids at
every square size dividing the grid, and the attention-weighted footprints of B's active
query tokens (head-averaged post-softmax cross-attention over the source grid).
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


def query_focus(attn: np.ndarray) -> dict[str, float]:
  """How sharply, and how differently, Q queries look at a source grid of S tokens.

  attn: (Q, S) head-averaged post-softmax attention (rows sum to 1). Returns
    peak      mean over queries of the largest weight (1/S: uniform; 1: one source token);
    sources   mean over queries of exp(entropy), the effective number of tokens each reads;
    distinct  how many different source tokens are some query's argmax (1 when every query
              looks at the same place: the bank has collapsed; up to min(Q, S)).
  A query bank that fetches fine detail reads few tokens each (high peak, low sources) and
  spreads its argmaxes over the detail (high distinct).
  """
  attn = np.asarray(attn, np.float64)
  if attn.ndim != 2 or attn.shape[0] == 0:
    raise ValueError(f"query attention must be (queries > 0, sources), got {attn.shape}")
  entropy = -np.sum(attn * np.log(np.maximum(attn, EPS)), axis=1)
  return {"peak": float(attn.max(axis=1).mean()), "sources": float(np.exp(entropy).mean()),
          "distinct": float(len(np.unique(attn.argmax(axis=1))))}


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


# ------------------------------------------------------------------------ CLI
# Below: runs a checkpoint (JAX, imported lazily so the analysis above stays numpy-only).

def _divisor_grids(grid: int) -> list[int]:
  """Square sizes s (2 <= s < grid) dividing the grid: the M3-style pooled grids."""
  return [s for s in range(2, grid) if grid % s == 0]


def analyse_run(run, budget: int, *, num_images: int = 64, batch_size: int = 32) -> dict:
  """Appendix A on the first ``num_images`` eval images for ``run`` at ``budget``.

  Returns ``{label: {"tokens", "grid", "radius", "nyquist_fraction", "profile", "curve",
  "mean_profile"}}`` (``concentration_curve`` outputs as lists); labels name the ViT grid,
  the budget's anchors, each M3-style grid and, when B has queries, the query footprints
  (whose entry also holds ``"focus"``: ``query_focus`` averaged over the images).
  """
  import functools

  import jax
  import jax.numpy as jnp
  from flax import nnx

  from parcel_jax import evaluation
  from parcel_jax.data import pipeline

  @functools.partial(jax.jit, static_argnames=("graphdef", "bucket"))
  def query_attention(graphdef, params, features, budgets, bucket):
    return nnx.merge(graphdef, params).connector.query_attention(features, bucket, budgets)

  space = run.method_space()
  if budget not in space.budgets:
    from parcel_jax import budgets as budgets_lib
    raise ValueError(f"budget {budget} is not valid for method {run.method!r}; allowed: "
                     f"{budgets_lib._describe(space.budgets)}")
  bucket = space.compact_bucket(budget)
  num_queries = budget - bucket.num_anchors
  g = run.grid_size
  source = pipeline.build_source(run.config.data, "eval")
  num_images = min(num_images, len(source))
  labels = {"vit": (f"ViT grid {g}x{g}", g * g, f"{g}x{g}")}
  if 0 < bucket.anchor_grid < g:
    a = bucket.anchor_grid
    labels["anchors"] = (f"{run.method} anchors {a}x{a} (B={budget})", a * a, f"{a}x{a}")
  for s in _divisor_grids(g):
    labels[f"m3_{s}"] = (f"M3 pooled {s}x{s}", s * s, f"{s}x{s}")
  if num_queries:
    labels["queries"] = (f"{run.method} queries x{num_queries} (B={budget})", num_queries,
                         f"attention over {g}x{g}")
  profiles = {k: [] for k in labels}
  focus = []
  for start in range(0, num_images, batch_size):
    images = np.stack([source[i]["image"] for i in range(start, min(start + batch_size, num_images))])
    features = evaluation.encode_images(run.graphdef, run.params, jnp.asarray(images))
    attn = None
    if num_queries:
      budgets = jnp.full((images.shape[0],), budget, jnp.int32)
      attn = np.asarray(query_attention(run.graphdef, run.params, features, budgets, bucket=bucket))
    features = np.asarray(features, np.float64)
    for i, grid in enumerate(features):
      profiles["vit"].append(grid_profile(grid))
      if "anchors" in labels:
        profiles["anchors"].append(grid_profile(pool_grid(grid, bucket.anchor_grid)))
      for s in _divisor_grids(g):
        profiles[f"m3_{s}"].append(grid_profile(pool_grid(grid, s)))
      if attn is not None:
        profiles["queries"].append(query_footprint_spectrum(attn[i, :num_queries], grid))
        focus.append(query_focus(attn[i, :num_queries]))
  curves = {}
  for key, (label, tokens, grid_desc) in labels.items():
    c = concentration_curve(profiles[key])
    curves[label] = {"tokens": tokens, "grid": grid_desc, **{k: v.tolist() for k, v in c.items()}}
    if key == "queries":  # per-image query_focus, averaged over the images
      curves[label]["focus"] = {k: float(np.mean([f[k] for f in focus])) for k in focus[0]}
  return curves


def plot_profiles(curves: Mapping[str, Mapping], path: str, title: str) -> None:
  """Normalised ring power (DC excluded) against r / r_max, log scale (PNG)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(5, 4))
  for name, c in curves.items():
    ax.plot(c["nyquist_fraction"], np.maximum(c["profile"], EPS), marker="o", label=name)
  ax.set_yscale("log")
  ax.set_xlabel("radial frequency r / r_max (fraction of Nyquist)")
  ax.set_ylabel("share of AC power per ring")
  ax.set_xlim(0, 1.02)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_report(run, budget: int, out: str, *, num_images: int = 64, batch_size: int = 32) -> dict:
  """Runs ``analyse_run`` and writes spectral_B.json, concentration_B.png, profiles_B.png."""
  import json
  import os

  curves = analyse_run(run, budget, num_images=num_images, batch_size=batch_size)
  report = {"workdir": run.workdir, "step": run.step, "method": run.method, "budget": budget,
            "num_images": num_images, "curves": curves,
            # Scalar summaries: larger = more low-pass.
            "summary": {k: {"first_ring": c["curve"][0], "mean_cumulative": float(np.mean(c["curve"]))}
                        for k, c in curves.items()}}
  os.makedirs(out, exist_ok=True)
  with open(os.path.join(out, f"spectral_{budget}.json"), "w") as f:
    json.dump(report, f, indent=2)
  title = f"{run.label()}, B={budget}, {num_images} eval images"
  plot_curves(curves, os.path.join(out, f"concentration_{budget}.png"), title=title)
  plot_profiles(curves, os.path.join(out, f"profiles_{budget}.png"), title=title)
  return report


def format_summary(report: dict) -> str:
  lines = [f"{'tokens':<40} {'n':>5} {'r_max':>5} {'ring 1':>7} {'mean cum.':>9}"]
  for label, c in report["curves"].items():
    s = report["summary"][label]
    lines.append(f"{label[:40]:<40} {c['tokens']:>5} {len(c['curve']):>5} "
                 f"{s['first_ring']:>7.3f} {s['mean_cumulative']:>9.3f}")
    if "focus" in c:
      f = c["focus"]
      lines.append(f"  query focus: peak weight {f['peak']:.3f}, effective sources {f['sources']:.1f}, "
                   f"distinct argmax tokens {f['distinct']:.1f} (of {c['tokens']} queries)")
  return "\n".join(lines)


def main(argv) -> None:
  import os

  from absl import flags

  from parcel_jax import runs
  from parcel_jax import cli

  del argv
  cli.quiet_library_logs()
  f = flags.FLAGS
  out = f.out or os.path.join(f.workdir, "spectral")
  try:
    run = runs.load_run(f.workdir, f.step)
    report = write_report(run, f.budget, out, num_images=f.num_images, batch_size=f.batch_size)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: {e}") from e
  print(format_summary(report))
  print(f"wrote {out}/spectral_{f.budget}.json, concentration_{f.budget}.png, profiles_{f.budget}.png",
        flush=True)


def _define_flags() -> None:
  """Only when run as a script."""
  from absl import flags

  flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
  flags.DEFINE_integer("budget", None, "Visual-token budget B.")
  flags.DEFINE_string("out", None, "Output directory (default: WORKDIR/spectral).")
  flags.DEFINE_integer("num_images", 64, "Eval images averaged over.")
  flags.DEFINE_integer("batch_size", 32, "Images per ViT batch.")
  flags.mark_flags_as_required(["workdir", "budget"])


if __name__ == "__main__":
  from absl import app

  _define_flags()
  app.run(main)
