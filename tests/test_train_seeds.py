"""Training-seed spread (train_seeds.py): the summary's numbers, the seed lists it accepts, and
a tiny run of two training seeds end to end."""
import json

import pytest

from diffrecon_jax import train_seeds


def _doc(maes, rmses, method="diffrecon"):
  return {"dataset": "nytaxi", "units": "trips", "method": method,
          "results": [{"pattern": p, "missing_ratio": r, "mae": a, "rmse": b}
                      for (p, r), a, b in zip([("fixed", 0.2), ("random", 0.4)], maes, rmses)]}


def _scored(d_maes):
  refs = {"prior": _doc([1.5, 2.5], [3.0, 4.0], "prior"),
          "climatology": _doc([1.6, 2.4], [3.1, 3.9], "climatology"),
          "interp": _doc([9.0, 9.0], [19.0, 19.0], "interp")}
  return {"diffrecon": _doc(d_maes, [2.0, 3.0]), **refs}


def test_summary_means_over_mask_seeds_and_spreads_over_training_seeds():
  docs = {0: {0: _scored([1.0, 2.0]), 1: _scored([1.2, 2.2])},
          1: {0: _scored([1.3, 2.6]), 1: _scored([1.5, 2.8])}}
  s = train_seeds.summarise(docs)
  fixed = s["patterns"][0]
  assert fixed["diffrecon"]["mae"]["t0_m1"] == 1.2
  assert fixed["diffrecon"]["mae"]["t0"] == pytest.approx(1.1)
  assert fixed["diffrecon"]["mae"]["t1"] == pytest.approx(1.4)
  assert fixed["spread"]["mae"] == pytest.approx(0.3)
  assert fixed["prior"]["mae"] == 1.5 and fixed["climatology"]["rmse"] == 3.1
  seed0, seed1 = s["per_seed"]
  # Seed 0: mean MAE (1.1 + 2.1) / 2 = 1.6; the better reference is climatology (2.0 = prior's).
  assert seed0["mean_mae"] == pytest.approx(1.6)
  assert seed0["margin_percent"] == pytest.approx(-20.0)
  assert (seed0["mae_wins"], seed1["mae_wins"]) == (2, 1)  # seed 1's random:0.4, 2.7 > 2.4
  text = train_seeds.markdown(s)
  assert "| fixed:0.2 | MAE | 1.000 | 1.200 | 1.300 | 1.500 | 1.100 | 1.400 | 0.300 |" in text
  assert "| 1 | 2.050 |" in text


@pytest.mark.parametrize("text", ["", "0,0", "-1", "a,1"])
def test_bad_seed_lists_are_refused(text):
  with pytest.raises(ValueError, match="--train_seeds"):
    train_seeds.parse_seeds(text, "train_seeds")


def test_two_tiny_training_seeds_run_end_to_end_and_resume(tmp_path):
  from diffrecon_jax.configs import nytaxi
  from diffrecon_jax import smoke
  config = smoke.smoke_config(nytaxi.get_config())
  config.patterns.eval = ("random:0.4", "large_scale:0.25")
  s = train_seeds.run_seeds(config, tmp_path, [0, 1], [3])
  assert s["train_seeds"] == [0, 1] and s["mask_seeds"] == [3]
  crps = []
  for t in (0, 1):
    saved = json.loads((tmp_path / f"seed_{t}" / "config.json").read_text())
    assert saved["seed"] == t
    doc = json.loads((tmp_path / f"seed_{t}" / "mask_seed_3" / "results_diffrecon.json")
                     .read_text())
    assert doc["seed"] == 3 and len(doc["results"]) == 2
    crps.append([r["crps"] for r in doc["results"]])
  # The training seed changes the model: its members differ (at 4 steps the point estimate
  # may be the prior's, chosen on validation, and then equal across seeds).
  assert crps[0] != crps[1]
  assert json.loads((tmp_path / "train_seeds.json").read_text()) == json.loads(json.dumps(s))
  # A second call reads the scored results back instead of training or scoring again.
  stamp = (tmp_path / "seed_1" / "mask_seed_3" / "results.json").stat().st_mtime_ns
  train_seeds.run_seeds(config, tmp_path, [0, 1], [3])
  assert (tmp_path / "seed_1" / "mask_seed_3" / "results.json").stat().st_mtime_ns == stamp
