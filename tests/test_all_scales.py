"""M3's original objective (``budget.sampling='all_scales'``): the loss averaged over every
scale each step equals the mean of the single-scale steps, and a run trains with it."""

import jax
import numpy as np

from parcel_jax import config as config_lib
from parcel_jax import train
from tests.test_accumulation import Stepper, first_batch, single_device_mesh, tiny_config
from tests.test_train import read_metrics
from tests import util


def test_all_scales_step_is_the_mean_of_the_single_scale_steps():
  config = tiny_config(**{"model.connector.method": "m3", "model.connector.budgets": (4, 16, 64),
                          "budget.sampling": "all_scales", "eval.budgets": (16,)})
  _, spec = config_lib.validate_config(config)
  batch, scales, budget_vec = first_batch(config)
  assert [b for _, b in scales] == [4, 16, 64] and set(budget_vec) == {64}
  stepper = Stepper(config, single_device_mesh())
  together = stepper((batch, scales, budget_vec))
  singles = [stepper((batch, bucket, np.full_like(budget_vec, b))) for bucket, b in scales]
  mean = {"loss": float(np.mean([s["loss"] for s in singles])),
          "grads": jax.tree.map(lambda *g: np.mean(np.stack(g), 0), *[s["grads"] for s in singles])}
  losses = sorted(s["loss"] for s in singles)
  assert losses[-1] - losses[0] > 1e-4  # the scales differ, so the mean is a real test
  assert abs(together["loss"] - mean["loss"]) / mean["loss"] < 1e-5
  errs = [np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-6)
          for a, e in zip(jax.tree.leaves(together["grads"]), jax.tree.leaves(mean["grads"]))
          if np.linalg.norm(e) > 1e-6]
  assert max(errs) < 1e-4, max(errs)
  assert stepper.step.num_compiled == 1 + len(scales)  # the tuple form is one program


def test_m3_trains_and_evaluates_with_all_scales(tmp_path):
  config = util.tiny_config(**{"model.connector.method": "m3", "budget.sampling": "all_scales",
                               "train.num_steps": 3, "eval.budgets": (16, 64)})
  result = train.train_and_evaluate(config, str(tmp_path))
  assert set(result["budgets"]) == {"16", "64"}
  records = read_metrics(str(tmp_path))
  assert records[-1]["compiled_programs"] == 1 and all(np.isfinite(r["loss"]) for r in records)
  _, spec = config_lib.validate_config(config)
  assert records[-1]["budget"] == spec.budgets[-1]
