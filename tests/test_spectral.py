"""Tests for the Appendix A spectral analysis, against analytic answers."""

import numpy as np
import pytest

from parcel_jax import spectral


def sinusoid(h, w, kx, ky, channels=3):
  """(H, W, C) cos(2 pi (kx x / W + ky y / H)), x along W, with per-channel amplitudes/offsets."""
  y, x = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  wave = np.cos(2 * np.pi * (kx * x / w + ky * y / h))
  amp = np.arange(1, channels + 1, dtype=np.float64)
  return wave[..., None] * amp + 5.0 * amp  # offsets must vanish with the mean subtraction


@pytest.mark.parametrize("h, w, kx, ky, ring", [
    (32, 32, 3, 4, 5),   # rho = 5 exactly
    (32, 32, 2, 3, 4),   # rho = 3.61 -> ring 4
    (16, 16, 0, 1, 1),
    (16, 24, 5, 0, 5),   # non-square grid
])
def test_sinusoid_power_in_one_ring(h, w, kx, ky, ring):
  grid = sinusoid(h, w, kx, ky)
  power = spectral.power_spectrum(grid)
  assert power.shape == (h, w)
  # cos = (e^+ + e^-)/2: two conjugate peaks at +-(ky, kx), each |F|^2 = amp^2 / 4.
  peak = np.mean(np.arange(1, 4) ** 2) / 4
  assert np.isclose(power[h // 2 + ky, w // 2 + kx], peak)
  assert np.isclose(power[h // 2 - ky, w // 2 - kx], peak)
  profile = spectral.radial_profile(power)
  assert profile.shape == (min(h, w) // 2 + 1,)
  members = (spectral.ring_index((h, w)) == ring).sum()
  assert np.isclose(profile[ring] * members, 2 * peak)  # all power, as a ring mean
  assert np.allclose(np.delete(profile, ring), 0, atol=1e-20)


def test_parseval():
  # Identity for the 1/(HW) normalisation: sum_{u,v} |F_c|^2 = mean_{x,y} (x_c - mean x_c)^2,
  # so the channel-averaged power sums to the channel-averaged spatial variance.
  grid = np.random.default_rng(0).normal(size=(12, 20, 5)) * np.arange(1, 6)
  power = spectral.power_spectrum(grid)
  assert np.isclose(power.sum(), grid.var(axis=(0, 1)).mean())
  assert np.isclose(power[6, 10], 0)  # DC (after fftshift) is zero: the mean is subtracted


def test_constant_grid_has_no_ac_power():
  grid = np.ones((8, 8, 4)) * np.array([1.0, -2.0, 3.0, 7.0])
  assert np.allclose(spectral.power_spectrum(grid), 0)
  assert np.allclose(spectral.radial_profile(spectral.power_spectrum(grid)), 0)


def test_radial_profile_is_a_ring_mean():
  # White noise has a flat expected spectrum: the ring MEAN is flat, a ring sum would grow
  # ~ linearly with r (the outer ring has ~16x the members of ring 2 here).
  grid = np.random.default_rng(1).normal(size=(64, 64, 64))
  power = spectral.power_spectrum(grid)
  profile = spectral.radial_profile(power)
  ac = profile[1:]
  assert np.all(np.abs(ac / ac.mean() - 1) < 0.25)
  assert np.isclose(ac.mean() * 64 * 64, 1, rtol=0.05)  # unit variance spread over HW bins
  rings = spectral.ring_index(power.shape)
  assert np.isclose(profile[7], power[rings == 7].mean())
  assert (rings == 32).sum() > 10 * (rings == 2).sum()


def test_ring_membership():
  rings = spectral.ring_index((8, 8))
  assert rings[4, 4] == 0 and rings[4, 5] == 1 and rings[5, 5] == 1  # rho = sqrt(2) < 1.5
  assert rings[6, 6] == 3  # rho = 2.83
  # Corners beyond r_max = 4 are dropped, not folded into the last ring.
  power = np.zeros((8, 8))
  power[0, 0] = 1.0  # rho = sqrt(32) = 5.66 -> ring 6 > r_max
  assert np.allclose(spectral.radial_profile(power), 0)


def test_concentration_curve():
  rng = np.random.default_rng(2)
  profiles = [spectral.grid_profile(rng.normal(size=(16, 16, 8))) for _ in range(4)]
  out = spectral.concentration_curve(profiles)
  curve = out["curve"]
  assert curve.shape == (8,) and out["radius"].tolist() == list(range(1, 9))
  assert np.all(np.diff(curve) >= 0)
  assert np.isclose(curve[-1], 1.0)
  assert np.isclose(out["profile"].sum(), 1.0)
  # The data-set average is taken before normalising; the DC ring is excluded.
  stacked = np.stack(profiles)
  assert np.allclose(out["mean_profile"], stacked.mean(0))
  assert np.allclose(out["profile"], stacked.mean(0)[1:] / stacked.mean(0)[1:].sum())
  # All power in ring 1 -> the curve is 1 from the first ring on.
  low = spectral.concentration_curve(spectral.grid_profile(sinusoid(16, 16, 1, 0)))
  assert np.allclose(low["curve"], 1.0)
  # A zero profile stays finite (epsilon) instead of dividing by zero.
  assert np.all(np.isfinite(spectral.concentration_curve(np.zeros((2, 5)))["curve"]))


def test_smooth_grid_concentrates_earlier_than_noise():
  rng = np.random.default_rng(3)
  noise = rng.normal(size=(16, 16, 8))
  smooth = np.repeat(np.repeat(rng.normal(size=(4, 4, 8)), 4, 0), 4, 1)  # piecewise constant
  c_noise = spectral.concentration_curve(spectral.grid_profile(noise))["curve"]
  c_smooth = spectral.concentration_curve(spectral.grid_profile(smooth))["curve"]
  assert c_smooth[1] > c_noise[1] + 0.2


def test_footprint_uniform_attention_equals_plain_spectrum():
  grid = np.random.default_rng(4).normal(size=(8, 8, 6))
  attn = np.full((5, 64), 1 / 64)
  got = spectral.query_footprint_spectrum(attn, grid, chunk=2)
  assert np.allclose(got, spectral.grid_profile(grid))


def test_footprint_one_hot_attention_is_flat():
  # Attention on one position p: the weighted grid is S * g_p at p and 0 elsewhere, whose
  # DFT / (HW) has |F(u)|^2 = g_p^2 for every u != 0 -> a flat AC profile mean_c g_{p,c}^2.
  grid = np.random.default_rng(5).normal(size=(8, 8, 3))
  attn = np.zeros((2, 64))
  attn[0, 9] = 1.0   # (1, 1)
  attn[1, 42] = 1.0  # (5, 2)
  got = spectral.query_footprint_spectrum(attn, grid)
  want = ((grid[1, 1] ** 2).mean() + (grid[5, 2] ** 2).mean()) / 2
  assert np.allclose(got[1:], want)


def test_footprint_rejects_mismatched_grid():
  with pytest.raises(ValueError, match="source grid"):
    spectral.query_footprint_spectrum(np.ones((2, 63)), np.ones((8, 8, 1)))


def test_query_focus_of_distinct_one_hot_queries():
  rng = np.random.default_rng()
  sources = rng.permutation(64)[:5]           # five queries, each on its own token
  attn = np.zeros((5, 64))
  attn[np.arange(5), sources] = 1.0
  assert spectral.query_focus(attn) == pytest.approx({"peak": 1.0, "sources": 1.0, "distinct": 5.0})


def test_query_focus_of_a_collapsed_bank():
  # Every query reads the same k tokens evenly: peak 1/k, k effective sources, one argmax.
  rng = np.random.default_rng()
  k = int(rng.integers(2, 16))
  attn = np.zeros((7, 64))
  attn[:, rng.permutation(64)[:k]] = 1 / k
  assert spectral.query_focus(attn) == pytest.approx({"peak": 1 / k, "sources": k, "distinct": 1.0})


def test_query_focus_of_uniform_and_random_attention():
  assert spectral.query_focus(np.full((3, 64), 1 / 64)) == pytest.approx(
      {"peak": 1 / 64, "sources": 64.0, "distinct": 1.0})
  logits = np.random.default_rng().normal(size=(9, 64)) * 3
  attn = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  got = spectral.query_focus(attn)
  assert 1 / 64 < got["peak"] < 1 and 1 < got["sources"] < 64 and 1 <= got["distinct"] <= 9
  with pytest.raises(ValueError, match="queries > 0"):
    spectral.query_focus(np.ones((0, 64)))


def test_pool_grid():
  grid = np.arange(16 * 16 * 2, dtype=np.float64).reshape(16, 16, 2)
  pooled = spectral.pool_grid(grid, 4)
  assert pooled.shape == (4, 4, 2)
  assert np.allclose(pooled[1, 2], grid[4:8, 8:12].mean(axis=(0, 1)))
  assert np.allclose(spectral.pool_grid(grid, 16), grid)
  with pytest.raises(ValueError, match="pool"):
    spectral.pool_grid(grid, 32)  # never upsample
  with pytest.raises(ValueError, match="pool"):
    spectral.pool_grid(grid, 5)


def test_pooling_removes_the_highest_frequency():
  # A Nyquist checkerboard (period 2) averages out under 2x2 pooling.
  grid = sinusoid(16, 16, 8, 8, channels=1)
  assert np.allclose(spectral.power_spectrum(spectral.pool_grid(grid, 8)), 0)


def test_plot_curves(tmp_path):
  rng = np.random.default_rng(6)
  curves = {
      "anchors 4x4": spectral.concentration_curve(spectral.grid_profile(rng.normal(size=(4, 4, 3)))),
      "vit 16x16": spectral.concentration_curve(spectral.grid_profile(rng.normal(size=(16, 16, 3))))["curve"],
  }
  path = tmp_path / "curves.png"
  spectral.plot_curves(curves, str(path))
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
