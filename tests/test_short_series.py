"""Short-series cases: the grid files they write, the summary, and one tiny case end to end."""
import json

import numpy as np
import pytest

from diffrecon_jax import short_series
from diffrecon_jax.data import example_grid
from diffrecon_jax.data import nyc_dsan


def test_cases_write_the_first_or_last_days_of_their_dataset(tmp_path):
  import netCDF4
  taxi = nyc_dsan.load_nytaxi()
  path = short_series.write_case_grid("nytaxi:first", 2, tmp_path / "a")
  with netCDF4.Dataset(path) as ds:
    values = np.asarray(ds["flow"][:])
  np.testing.assert_array_equal(values, taxi.values[:96])
  bike = example_grid.example_series(dataset="nybike", last=96)
  np.testing.assert_array_equal(bike.timestamps, nyc_dsan.load_nybike().timestamps[-96:])


@pytest.mark.parametrize("case", ["nytaxi", "nybike:middle", "pems:first"])
def test_a_bad_case_is_refused_by_name(case):
  with pytest.raises(ValueError, match="DATASET:first or DATASET:last"):
    short_series.parse_case(case)


def test_first_and_last_together_are_refused():
  with pytest.raises(ValueError, match="not both"):
    example_grid.example_series(first=10, last=10)


def _doc(maes, rmses):
  return {"results": [{"mae": a, "rmse": b} for a, b in zip(maes, rmses)]}


def test_summary_counts_wins_over_both_references_and_the_margin():
  docs = {"diffrecon": _doc([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]),
          "prior": _doc([1.1, 1.9, 3.3], [1.2, 2.5, 2.9]),
          "climatology": {**_doc([1.2, 2.1, 3.1], [1.1, 2.1, 3.5]),
                          "calendar_table": {"table": "blend:2"}},
          "interp": _doc([5.0, 5.0, 5.0], [9.0, 9.0, 9.0])}
  s = short_series.summarise("nybike:last", docs)
  assert s["mae_wins"] == 2 and s["rmse_wins"] == 2 and s["calendar_table"] == "blend:2"
  # The better reference by mean MAE is the prior (2.1 vs 2.133): 2.0 / 2.1 - 1 = -4.76%.
  assert s["margin_percent"] == pytest.approx(-100 / 21)
  assert "| nybike:last | blend:2 | 2.000 | 2.100 |" in short_series.markdown([s])


def test_a_tiny_case_runs_end_to_end_and_resumes_from_its_results(tmp_path):
  from diffrecon_jax.configs import custom
  from diffrecon_jax import smoke
  base = smoke.smoke_config(custom.get_config())
  base.patterns.eval = ("random:0.4", "large_scale:0.25")
  summaries = short_series.run_cases(base, tmp_path, ["nybike:last"], days=10)
  assert [s["case"] for s in summaries] == ["nybike:last"]
  run = tmp_path / "nybike_last" / "run"
  for method in ("diffrecon", "prior", "climatology", "interp"):
    doc = json.loads((run / f"results_{method}.json").read_text())
    assert [r["pattern"] for r in doc["results"]] == ["random", "large_scale"]
  saved = json.loads((tmp_path / "short_series.json").read_text())
  assert saved[0]["patterns"] == 2 and set(saved[0]["mean_mae"]) == {
      "diffrecon", "prior", "climatology", "interp"}
  # A second call reads the finished results instead of training again.
  stamp = (run / "results.json").stat().st_mtime_ns
  short_series.run_cases(base, tmp_path, ["nybike:last"], days=10)
  assert (run / "results.json").stat().st_mtime_ns == stamp
