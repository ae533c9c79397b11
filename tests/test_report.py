"""launch/report.py: a sweep's runs summarised over seeds, from fake eval.json files.

The scores are random (a fresh generator each run; its seed is in the failure
messages); the expected means, stds and retentions are recomputed here with numpy.
"""

import importlib.util
import json
import os

import numpy as np
import pytest

from configs import base
from parcel_jax.data import synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KEYS = ("overall", *synthetic.FAMILIES)
SEEDS = (0, 1, 2)
# The reproduction preset's workdir names (launch/sweep.py) and the budgets each method
# is evaluated at on the default eval.budgets (4, 16, 32, 64, 128, 256).
VARIANTS = {
    "method=parcel": ("parcel", (16, 32, 64, 128, 256)),
    "method=m3": ("m3", (4, 16, 64, 256)),
    "method=mqt": ("mqt", (4, 16, 32, 64, 128, 256)),
    "method=none": ("none", (256,)),
    "method=m3,budgets=16": ("m3", (16,)),
    "method=m3,budgets=64": ("m3", (64,)),
}
ORDER = ["method=parcel", "method=m3", "method=m3,budgets=16", "method=m3,budgets=64",
         "method=mqt", "method=none"]


def load_report():
  spec = importlib.util.spec_from_file_location("launch_report", os.path.join(ROOT, "launch", "report.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


report = load_report()


def eval_json(rng, method, budgets, num_examples=1024):
  """A dict in exactly the schema train.py writes to eval.json."""
  return {
      "method": method, "num_examples": num_examples,
      "budgets": {str(b): {k: float(rng.uniform(0.05, 1.0)) for k in KEYS} for b in budgets},
      "token_metrics": {str(b): {"loss": float(rng.uniform(0.1, 2.0)),
                                 "token_accuracy": float(rng.uniform(0.3, 1.0))} for b in budgets},
      "steps": 1000,
      "parameters": {"vision": 18368, "connector": 0, "projection": 1056, "decoder": 13824,
                     "total": 33248},
  }


def write_run(root, name, result=None, config=None):
  workdir = root / name
  workdir.mkdir(parents=True)
  (workdir / "metrics.jsonl").write_text("{}\n")
  if result is not None:
    (workdir / "eval.json").write_text(json.dumps(result, indent=2))
  if config is not None:  # the config item of a checkpoint, as checkpoint.Checkpointer saves it
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager(str(workdir / "checkpoints"),
                                    options=ocp.CheckpointManagerOptions(create=True))
    manager.save(1000, args=ocp.args.Composite(config=ocp.args.JsonSave(
        json.loads(config.to_json_best_effort()))))
    manager.wait_until_finished()
    manager.close()
  return workdir


@pytest.fixture
def rng():
  seed = np.random.SeedSequence().entropy
  return seed, np.random.default_rng(seed)


@pytest.fixture
def sweep(tmp_path, rng):
  """A reproduction sweep: mqt seed 2 unfinished, parcel seed 1 without budget 64."""
  _, gen = rng
  root = tmp_path / "sweep"
  results = {}
  for variant, (method, budgets) in VARIANTS.items():
    for seed in SEEDS:
      name = f"{variant},seed={seed}"
      if variant == "method=mqt" and seed == 2:
        write_run(root, name)  # started, no eval.json yet
        (root / name / "checkpoints").mkdir()
        continue
      result = eval_json(gen, method, budgets)
      if variant == "method=parcel" and seed == 1:
        del result["budgets"]["64"], result["token_metrics"]["64"]
      write_run(root, name, result)
      results[(variant, seed)] = result
  (root / "notes").mkdir()  # not a run
  return root, results


def expected(results, variant, budget, key):
  values = [results[(variant, s)]["budgets"][str(budget)][key] for s in SEEDS
            if (variant, s) in results and str(budget) in results[(variant, s)]["budgets"]]
  return np.mean(values), (np.std(values, ddof=1) if len(values) > 1 else None), len(values)


def test_report_means_stds_retention(sweep, rng, tmp_path, capsys):
  root, results = sweep
  out = tmp_path / "out"
  msg = f"generator seed {rng[0]}"
  assert report.main([f"--root={root}", f"--out={out}"]) == 0, msg
  printed = capsys.readouterr().out
  summary = json.loads((out / "summary.json").read_text())

  assert list(summary["variants"]) == ORDER, msg
  assert summary["seeds"] == list(SEEDS) and summary["num_runs"] == len(results)
  ref = summary["reference"]
  assert ref["variant"] == "method=none" and ref["budget"] == 256 and ref["n"] == 3
  ref_mean = {k: expected(results, "method=none", 256, k)[0] for k in KEYS}
  for variant, (method, budgets) in VARIANTS.items():
    v = summary["variants"][variant]
    assert v["method"] == method and v["label"] == variant
    assert sorted(map(int, v["budgets"])) == list(budgets), msg
    for b in budgets:
      row = v["budgets"][str(b)]
      for k in KEYS:
        mean, std, n = expected(results, variant, b, k)
        got = row["scores"][k]
        assert got["n"] == n == row["n"], (variant, b, k, msg)
        assert got["mean"] == pytest.approx(mean, rel=1e-12), (variant, b, k, msg)
        assert got["std"] == pytest.approx(std, rel=1e-12), (variant, b, k, msg)
        assert row["retention"][k] == pytest.approx(100 * mean / ref_mean[k], rel=1e-12), msg

  # Missing runs and budgets: counted, not crashed on.
  mqt = summary["variants"]["method=mqt"]
  assert mqt["seeds"] == [0, 1] and mqt["missing_seeds"] == [2]
  assert mqt["unfinished"] == ["method=mqt,seed=2"]
  assert all(row["n"] == 2 and row["missing_seeds"] == [2] for row in mqt["budgets"].values())
  parcel = summary["variants"]["method=parcel"]["budgets"]
  assert parcel["64"]["n"] == 2 and parcel["64"]["seeds"] == [0, 2] and parcel["64"]["missing_seeds"] == [1]
  assert parcel["16"]["n"] == 3 and parcel["16"]["missing_seeds"] == []
  assert [u["name"] for u in summary["unfinished"]] == ["method=mqt,seed=2"]
  assert summary["variants"]["method=m3,budgets=16"]["specialist"]
  assert not summary["variants"]["method=m3"]["specialist"]

  # Markdown: printed, every variant, one table per budget, mean ± std in %.
  md = (out / "summary.md").read_text()
  assert printed == md
  for variant in VARIANTS:
    assert f"| {variant} |" in md
  for b in (4, 16, 32, 64, 128, 256):
    assert f"## Exact match at B = {b}" in md
  assert "## Retention vs method=none (B = 256, n = 3)" in md
  section = md.split("## Exact match at B = 16")[1].split("##")[0]
  (line,) = [l for l in section.splitlines() if l.startswith("| method=parcel |")]
  cells = [c.strip() for c in line.strip("|").split("|")]
  assert cells[1] == "3"
  mean, std, _ = expected(results, "method=parcel", 16, "overall")
  m, s = (float(x) for x in cells[2].split("±"))
  assert m == pytest.approx(100 * mean, abs=0.051) and s == pytest.approx(100 * std, abs=0.051), msg
  assert "method=mqt: no finished run for seed 2" in md
  assert "method=parcel at B = 64: not in the eval.json of seed 1" in md
  assert "unfinished (no eval.json): method=mqt,seed=2" in md

  for png in ("pareto.png", "families.png"):
    data = (out / png).read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 1000, png


def test_report_labels_from_saved_configs_and_checks_eval_streams(tmp_path, rng, capsys):
  """Swept keys without the method (an ablation sweep): the saved config labels the
  specialist; a run on another eval stream is flagged."""
  _, gen = rng
  root = tmp_path / "ablation"
  write_run(root, "method=none,seed=0", eval_json(gen, "none", (256,)), base.get_config("none"))
  specialist = base.get_config("m3")
  specialist.model.connector.budgets = (16,)
  reweighted = specialist.copy_and_resolve_references()
  reweighted.data.family_weights.grounding = 7.0  # training mixture only
  for seed, cfg in ((0, specialist), (1, reweighted)):
    write_run(root, f"optim.lr=0.001,seed={seed}", eval_json(gen, "m3", (16,)), cfg)
  other = base.get_config("parcel")
  other.data.max_text_len = 20
  write_run(root, "sub/lr=0.01,seed=0", eval_json(gen, "parcel", (16, 64)), other)
  out = tmp_path / "out"
  assert report.main([f"--root={root}", f"--out={out}"]) == 0
  summary = json.loads((out / "summary.json").read_text())
  v = summary["variants"]["optim.lr=0.001"]
  assert v["label"] == "optim.lr=0.001 (m3) [B=16]" and v["trained_budgets"] == [16]
  assert v["specialist"] and v["seeds"] == [0, 1] and v["budgets"]["16"]["n"] == 2
  assert summary["variants"]["sub/lr=0.01"]["label"] == "sub/lr=0.01 (parcel)"
  assert summary["variants"]["sub/lr=0.01"]["trained_budgets"] == []
  assert summary["variants"]["sub/lr=0.01"]["missing_seeds"] == [1]
  assert any("different eval streams" in w and "sub/lr=0.01,seed=0" in w for w in summary["warnings"])
  stream_warning, = [w for w in summary["warnings"] if "different eval streams" in w]
  assert stream_warning.count("; ") == 1, stream_warning  # two streams: family_weights is train-only
  assert "different eval streams" in capsys.readouterr().out


def test_report_without_runs_is_a_clear_error(tmp_path, capsys):
  assert report.main([f"--root={tmp_path / 'missing'}"]) == 2
  assert "is not a directory" in capsys.readouterr().err
  root = tmp_path / "empty"
  write_run(root, "method=parcel,seed=0")  # started, never finished
  assert report.main([f"--root={root}"]) == 2
  err = capsys.readouterr().err
  assert "report.py: error: no runs under" in err and "eval.json" in err and "1 unfinished" in err
  assert not (root / "report").exists()


def test_report_reference_must_be_a_variant(sweep, tmp_path, capsys):
  root, _ = sweep
  assert report.main([f"--root={root}", f"--out={tmp_path / 'o'}", "--reference=method=nope"]) == 2
  assert "--reference=method=nope is not a variant" in capsys.readouterr().err
