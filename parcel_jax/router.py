"""A learned budget router: which budgets will answer this request correctly?

The router reads only what exists before the decoder runs:

  anchors  the ViT features mean-pooled to a 4x4 grid, (16, Dv) (for PARCEL these are its
           16 pooled anchors; any method's ViT grid pools alike)
  prompt   a bag of the prompt's token ids, hashed into ``prompt_buckets`` counts

standardised with the training set's mean and deviation, and predicts per budget b the
probability that the greedy answer at b is correct: k sigmoid outputs of a linear map
(``hidden=0``, multi-label logistic regression) or of a one-hidden-layer ReLU MLP. The
policy sends a request to the smallest budget whose probability is >= ``threshold``, the
largest where none is (``policies.first_confident``, the cascade's rule).

Labels come from per-example scores of the training split only (``policy_scores.collect
(split="train")``); ``train`` refuses any other split, and the router keeps the indices of
the examples it was fit on (``train_index``) so that anyone can check them against an eval
set. It is trained on the host (optax Adam, full batch, L2 on the weights, its strength
chosen on a held-out part of the training examples) and saved as one safetensors file (the
arrays, and the configuration as metadata).

Cost (``flops``, per request, 2 FLOPs per multiply-add as Appendix C; the parameter-free
pooling, hashing and standardisation are left out as the paper leaves out pooling and norms):
2 d k for the linear router, 2 d h + 2 h k with a hidden layer; d = 16 Dv + prompt_buckets.
"""

from __future__ import annotations

import dataclasses
import json
import os

import einops
import numpy as np
from absl import logging

from parcel_jax import policies

ANCHOR_GRID = 4
PROMPT_BUCKETS = 256
FORMAT = "parcel_jax.router/1"
_STD_FLOOR = 1e-6


def pool_anchors(features: np.ndarray, grid: int = ANCHOR_GRID) -> np.ndarray:
  """ViT features (..., g, g, Dv) -> their means over a ``grid`` x ``grid`` grid of equal
  cells, (..., grid * grid, Dv) float32, row-major; ValueError if ``grid`` does not divide g."""
  features = np.asarray(features, np.float32)
  g = features.shape[-2]
  if features.ndim < 3 or features.shape[-3] != g or g % grid:
    raise ValueError(f"features of shape {features.shape} do not pool to a {grid}x{grid} grid: "
                     f"expected (..., g, g, Dv) with g divisible by {grid}")
  return einops.reduce(features, "... (p h) (q w) d -> ... (p q) d", "mean", p=grid, q=grid)


def prompt_bag(prompts: np.ndarray, buckets: int = PROMPT_BUCKETS) -> np.ndarray:
  """Prompt token ids (n, L) (-1 pads) -> counts (n, buckets) float32 of ``id % buckets``."""
  prompts = np.asarray(prompts, np.int64)
  if prompts.ndim != 2:
    raise ValueError(f"prompts must be (examples, length) token ids, got shape {prompts.shape}")
  rows, cols = np.nonzero(prompts >= 0)
  bag = np.zeros((prompts.shape[0], buckets), np.float32)
  np.add.at(bag, (rows, prompts[rows, cols] % buckets), 1.0)
  return bag


def inputs(anchors: np.ndarray, prompts: np.ndarray, buckets: int = PROMPT_BUCKETS) -> np.ndarray:
  """The router's raw inputs (n, d): anchors (n, cells, Dv) flattened, then ``prompt_bag``."""
  anchors = np.asarray(anchors, np.float32)
  return np.concatenate([anchors.reshape(anchors.shape[0], -1), prompt_bag(prompts, buckets)], axis=1)


def pad_prompts(prompts, length: int | None = None) -> np.ndarray:
  """A list of 1-D token-id arrays -> (n, length) int32, right-padded with -1."""
  length = length or max((len(p) for p in prompts), default=1)
  out = np.full((len(prompts), length), -1, np.int32)
  for i, p in enumerate(prompts):
    out[i, :len(p)] = p
  return out


@dataclasses.dataclass
class Router:
  """A trained router. ``params``: ``mean``, ``std`` (d,) of the training inputs and
  ``w1`` (d, h or k), ``b1``, and with a hidden layer ``w2`` (h, k), ``b2``."""
  budgets: tuple[int, ...]
  params: dict[str, np.ndarray]
  threshold: float = 0.5
  anchor_grid: int = ANCHOR_GRID
  prompt_buckets: int = PROMPT_BUCKETS
  train_split: str = "train"
  train_index: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
  weight_decay: float = 0.0

  @property
  def hidden(self) -> int:
    return int(self.params["w1"].shape[1]) if "w2" in self.params else 0

  @property
  def input_size(self) -> int:
    return int(self.params["w1"].shape[0])

  @property
  def flops(self) -> int:
    """FLOPs per request (see the module docstring)."""
    d, k = self.input_size, len(self.budgets)
    return 2 * d * k if not self.hidden else 2 * d * self.hidden + 2 * self.hidden * k

  def describe(self) -> str:
    kind = f"MLP, {self.hidden} hidden" if self.hidden else "linear"
    return (f"{kind}, {self.input_size} inputs, {self.flops} FLOPs, fit on {self.train_index.size} "
            f"{self.train_split} examples, weight decay {self.weight_decay:g}")

  def inputs(self, anchors: np.ndarray, prompts: np.ndarray) -> np.ndarray:
    """Raw inputs (n, d) from anchors (n, grid^2, Dv) and prompts (n, L) (-1 pads)."""
    x = inputs(anchors, prompts, self.prompt_buckets)
    if x.shape[1] != self.input_size:
      raise ValueError(f"router inputs have {x.shape[1]} features (anchors {np.shape(anchors)[1:]}, "
                       f"{self.prompt_buckets} prompt buckets); this router was trained on "
                       f"{self.input_size}: a different model's features?")
    return x

  def probabilities(self, anchors: np.ndarray, prompts: np.ndarray) -> np.ndarray:
    """P(correct) (n, k) at each of ``budgets``."""
    x = (self.inputs(anchors, prompts) - self.params["mean"]) / self.params["std"]
    return 1.0 / (1.0 + np.exp(-_logits(self.params, x, np)))

  def choose(self, features: np.ndarray, prompt: np.ndarray, threshold: float | None = None) -> int:
    """The budget for one request: ViT features (g, g, Dv) and its prompt ids (L,)."""
    prob = self.probabilities(pool_anchors(features, self.anchor_grid)[None], np.asarray(prompt)[None])
    col = policies.first_confident(prob, self.threshold if threshold is None else threshold)[0]
    return self.budgets[col]

  def save(self, path: str) -> None:
    from safetensors.numpy import save_file
    tensors = {k: np.ascontiguousarray(v, np.float32) for k, v in self.params.items()}
    tensors["train_index"] = np.ascontiguousarray(self.train_index, np.int64)
    meta = {"format": FORMAT, "budgets": json.dumps(list(self.budgets)), "threshold": repr(self.threshold),
            "anchor_grid": str(self.anchor_grid), "prompt_buckets": str(self.prompt_buckets),
            "train_split": self.train_split, "weight_decay": repr(self.weight_decay)}
    save_file(tensors, path, metadata=meta)


def load(path: str) -> Router:
  """The router ``Router.save`` wrote; FileNotFoundError / ValueError naming ``path``."""
  from safetensors import safe_open
  if not os.path.isfile(path):
    raise FileNotFoundError(f"router file {path} does not exist (python -m parcel_jax.compare_policies "
                            f"trains and writes one)")
  with safe_open(path, framework="numpy") as f:
    meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
      raise ValueError(f"{path} is not a router file (format {meta.get('format')!r}, expected {FORMAT!r})")
    arrays = {k: f.get_tensor(k) for k in f.keys()}
  train_index = arrays.pop("train_index")
  return Router(tuple(json.loads(meta["budgets"])), arrays, float(meta["threshold"]),
                int(meta["anchor_grid"]), int(meta["prompt_buckets"]), meta["train_split"], train_index,
                float(meta.get("weight_decay", 0.0)))


def _logits(params, x, xp):
  """The head's logits (n, k) on standardised inputs ``x`` (n, d); ``xp``: numpy or jax.numpy."""
  h = x @ params["w1"] + params["b1"]
  if "w2" in params:
    h = xp.maximum(h, 0.0) @ params["w2"] + params["b2"]
  return h


WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def _standardised(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  mean, std = x.mean(0), x.std(0)
  return mean.astype(np.float32), np.where(std > _STD_FLOOR, std, 1.0).astype(np.float32)  # constants stay 0


def _fit(x: np.ndarray, y: np.ndarray, *, hidden: int, steps: int, learning_rate: float,
         weight_decay: float, seed: int) -> tuple[dict, dict]:
  """Full-batch Adam on the mean sigmoid cross-entropy + weight_decay / 2 * |weights|^2 of
  standardised inputs x (n, d) and labels y (n, k) -> (mean, std) and the head's params."""
  import jax
  import jax.numpy as jnp
  import optax

  mean, std = _standardised(x)
  xs = (x - mean) / std
  d, k = xs.shape[1], y.shape[1]
  rng = np.random.default_rng(seed)
  width = hidden or k
  params = {"w1": rng.standard_normal((d, width)).astype(np.float32) / np.sqrt(d),
            "b1": np.zeros(width, np.float32)}
  if hidden:
    params["w2"] = rng.standard_normal((hidden, k)).astype(np.float32) / np.sqrt(hidden)
    params["b2"] = np.zeros(k, np.float32)
  optimizer = optax.adam(learning_rate)

  def loss_fn(p, xb, yb):
    bce = optax.sigmoid_binary_cross_entropy(_logits(p, xb, jnp), yb).mean()
    return bce + 0.5 * weight_decay * sum(jnp.sum(p[w] ** 2) for w in ("w1", "w2") if w in p)

  @jax.jit
  def fit(p, xb, yb):
    def step(_, carry):
      p, state = carry
      updates, state = optimizer.update(jax.grad(loss_fn)(p, xb, yb), state, p)
      return optax.apply_updates(p, updates), state
    return jax.lax.fori_loop(0, steps, step, (p, optimizer.init(p)))[0]

  with jax.default_device(jax.devices("cpu")[0]):   # a small problem: the host is enough
    fitted = fit(jax.tree.map(jnp.asarray, params), jnp.asarray(xs), jnp.asarray(y, jnp.float32))
    return {"mean": mean, "std": std}, jax.tree.map(np.asarray, fitted)


def _cross_entropy(params: dict, x: np.ndarray, y: np.ndarray) -> float:
  logits = _logits(params, (x - params["mean"]) / params["std"], np).astype(np.float64)
  return float(np.mean(np.maximum(logits, 0) - logits * y + np.log1p(np.exp(-np.abs(logits)))))


def train(scores: dict, *, hidden: int = 0, steps: int = 500, learning_rate: float = 1e-2,
          weight_decay: float | None = None, validation_fraction: float = 0.25, threshold: float = 0.5,
          seed: int = 0, anchor_grid: int = ANCHOR_GRID, prompt_buckets: int = PROMPT_BUCKETS) -> Router:
  """Fits a router to per-example scores of the training split.

  Args:
    scores: ``policy_scores.collect(..., split="train")``'s arrays: ``correct`` (n, k) labels,
      ``anchors`` (n, grid^2, Dv), ``prompt`` (n, L), ``index`` (n,), ``budgets`` (k,) and
      ``split`` (must be "train").
    hidden: 0 for a linear head, else the hidden layer's width.
    weight_decay: the L2 penalty on the weights (not the biases); None: the one of
      ``WEIGHT_DECAYS`` with the lowest cross-entropy on ``validation_fraction`` of these
      training examples held out (the inputs outnumber the examples: unpenalised, the head
      memorises them), then refit on all of them.
  """
  split = str(scores.get("split", ""))
  if split != "train":
    raise ValueError(f"the router is fit on the training split only; these scores are of split "
                     f"{split or 'unknown'!r} (policy_scores.collect(split='train') writes them)")
  missing = [k for k in ("anchors", "prompt", "correct", "index", "budgets") if k not in scores]
  if missing:
    raise ValueError(f"router training scores lack {missing} (policy_scores.collect writes them)")
  if steps < 1 or hidden < 0:
    raise ValueError(f"steps must be >= 1 and hidden >= 0, got steps={steps}, hidden={hidden}")
  budgets = tuple(int(b) for b in scores["budgets"])
  anchors = np.asarray(scores["anchors"], np.float32)
  if anchors.shape[1] != anchor_grid ** 2:
    raise ValueError(f"anchors have {anchors.shape[1]} cells; anchor_grid={anchor_grid} needs {anchor_grid ** 2}")
  x = inputs(anchors, scores["prompt"], prompt_buckets)
  y = np.asarray(scores["correct"], np.float32)
  fit = lambda rows, wd: _fit(x[rows], y[rows], hidden=hidden, steps=steps, learning_rate=learning_rate,
                              weight_decay=wd, seed=seed)
  everything = np.arange(len(y))
  held = int(round(validation_fraction * len(y)))
  if weight_decay is None and 0 < held < len(y):
    order = np.random.default_rng(seed).permutation(len(y))
    fit_rows, val_rows = order[held:], order[:held]
    losses = {}
    for wd in WEIGHT_DECAYS:
      stats, head = fit(fit_rows, wd)
      losses[wd] = _cross_entropy({**stats, **head}, x[val_rows], y[val_rows])
    weight_decay = min(losses, key=losses.get)
    logging.info("router weight decay %g (held-out cross-entropy per value: %s)", weight_decay,
                 ", ".join(f"{wd:g}: {v:.4f}" for wd, v in losses.items()))
  elif weight_decay is None:
    weight_decay = WEIGHT_DECAYS[len(WEIGHT_DECAYS) // 2]
  stats, head = fit(everything, weight_decay)
  router = Router(budgets, {**stats, **head}, float(threshold), anchor_grid, prompt_buckets, split,
                  np.asarray(scores["index"], np.int64).copy(), float(weight_decay))
  accuracy = ((router.probabilities(anchors, scores["prompt"]) >= 0.5) == (y > 0.5)).mean()
  logging.info("router: %s; training cross-entropy %.4f, per-budget correctness predicted right on "
               "%.1f%% of the training labels", router.describe(), _cross_entropy(router.params, x, y),
               100 * accuracy)
  return router
