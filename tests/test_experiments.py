"""The one-command comparison (experiments.py) and its table (comparison.py)."""
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from diffrecon_jax.configs import nytaxi
from diffrecon_jax import comparison, experiments, methods, run
from diffrecon_jax.diffrecon import checkpoints
from diffrecon_jax.diffrecon import loading

REPO = pathlib.Path(__file__).resolve().parents[1]


def _doc(method, maes, seed=0, rmse_factor=2.0):
  pats = [("fixed", 0.2), ("fixed", 0.8), ("random", 0.4)]
  return {"dataset": "toy", "method": method, "seed": seed, "scale_factor": 2,
          "coarse_shape": [2, 2], "fine_shape": [4, 4],
          "results": [{"pattern": p, "missing_ratio": r, "mae": m, "rmse": rmse_factor * m,
                       "crps": None, "n_test_slices": 5, "split": "test"}
                      for (p, r), m in zip(pats, maes)]}


def test_table_marks_best_and_second_and_the_main_methods_change():
  docs = {"a": [_doc("a", [1.0, 4.0, 2.0])], "b": [_doc("b", [2.0, 3.0, 3.0])],
          "diffrecon": [_doc("diffrecon", [0.5, 3.5, 2.5])]}
  rows = comparison.table_rows(docs)
  assert [(r["pattern"], r["missing_ratio"], r["metric"]) for r in rows][:2] == [
      ("fixed", 0.2, "MAE"), ("fixed", 0.2, "RMSE")]
  md = comparison.markdown(rows, list(docs), "diffrecon").splitlines()
  assert md[0].endswith("| diffrecon vs best other |")
  first = md[2]  # fixed 0.2 MAE: diffrecon 0.5 best, a 1.0 second; +50% against a
  assert "**0.500**" in first and "<u>1.000</u>" in first and "| 2.000 |" in first
  assert first.endswith("+50.0% |")
  fixed08 = md[4]  # b 3.0 best, diffrecon 3.5 second: -16.7% against b
  assert "**3.000**" in fixed08 and "<u>3.500</u>" in fixed08 and fixed08.endswith("-16.7% |")
  summary = comparison.wins_summary(rows, "diffrecon", ["a", "b"])
  assert summary.startswith("diffrecon is best on 2 of 6 rows.")
  assert "fixed:0.8 MAE (b 3.000 vs 3.500)" in summary and "random:0.4 MAE (a 2.000" in summary
  csv_lines = comparison.csv_text(rows, list(docs), "diffrecon").splitlines()
  assert csv_lines[0] == ("pattern,missing_ratio,metric,a,a_std,b,b_std,diffrecon,diffrecon_std,"
                          "diffrecon_improve_percent")
  assert csv_lines[1] == "fixed,0.2,mae,1,0,2,0,0.5,0,50.000"


def test_several_seeds_give_mean_and_spread():
  docs = {"a": [_doc("a", [1.0, 2.0, 3.0], 0), _doc("a", [3.0, 2.0, 3.0], 1)],
          "b": [_doc("b", [5.0, 5.0, 5.0], 0), _doc("b", [5.0, 5.0, 5.0], 1)]}
  rows = comparison.table_rows(docs)
  assert rows[0]["mean"]["a"] == pytest.approx(2.0) and rows[0]["std"]["a"] == pytest.approx(1.0)
  assert rows[0]["n"] == {"a": 2, "b": 2}
  assert "**2.000 ± 1.000**" in comparison.markdown(rows, ["a", "b"])


def test_parse_methods_orders_groups_and_names_unknown_ones():
  names = experiments.parse_methods("ablations,interp")
  assert names[0] == "interp" and names[1] == "diffrecon"
  assert "diffrecon-noJoint" in names and "diffc-srcnn" in names
  every = experiments.parse_methods("all")
  assert every.index("diffrecon") < every.index("diffrecon-noPre")
  assert set(experiments.baselines()) <= set(every) and "climatology" in every
  with pytest.raises(ValueError, match="unknown method or group 'vdsr'"):
    experiments.parse_methods("srcnn,vdsr")


def test_method_config_sets_method_and_ablation():
  c = nytaxi.get_config()
  m = methods.method_config(c, "diffc-urbanfm")
  assert (m.method, m.ablation, m.ablation_fine_network) == ("diffrecon", "noFG", "urbanfm")
  m = methods.method_config(c, "diffrecon-noPre")
  assert (m.method, m.ablation) == ("diffrecon", "noPre")
  m = methods.method_config(c, "srcnn")
  assert (m.method, m.ablation) == ("srcnn", "")
  assert c.method == "diffrecon" and c.ablation == ""
  m = methods.method_config(c, experiments.PAPER)
  assert (m.method, m.ablation, m.diffusion.prediction, m.sampling.point, m.sampling.sampler) == (
      "diffrecon", "", "eps", "median", "ddpm")
  assert m.calibration.val_slices == 270  # a quarter of nytaxi's validation slices
  assert m.train.steps_c == c.train.steps_c and m.train.steps_joint == c.train.steps_joint


def test_budgets_are_equal_terms_and_listed_per_method():
  c = nytaxi.get_config()
  t = c.train
  ours = experiments.training_budget(c, "diffrecon")
  assert ours == {"training": f"Diffusion-C {t.steps_c} + Diffusion-F {t.steps_f} + joint "
                              f"{t.steps_joint} steps", "batch": t.batch_size}
  assert experiments.training_budget(c, experiments.PAPER) == ours
  # The ablations list the steps they train, not the config's as given.
  assert experiments.training_budget(c, "diffrecon-noPre")["training"] == (
      f"joint {t.steps_c + t.steps_joint} steps")
  assert experiments.training_budget(c, "diffc-urbanfm")["training"] == (
      f"Diffusion-C {t.steps_c}; urbanfm {c.baselines.steps} steps")
  # UrbanSTA's stages and DiffUFlow's steps follow DiffRecon's (the configs' -1).
  assert experiments.training_budget(c, "urbansta") == {
      "training": f"STA {t.steps_c} + FIN {t.steps_f} + joint {t.steps_joint} steps",
      "batch": t.batch_size}
  assert experiments.training_budget(c, "diffuflow")["training"].startswith(f"{t.steps_f} steps")
  assert experiments.training_budget(c, "interp")["batch"] is None
  table = experiments.budget_table({"srcnn": dict(experiments.training_budget(c, "srcnn"),
                                                  wall_s=12.3)})
  assert f"| srcnn | {c.baselines.steps} steps | {c.baselines.batch_size} | - | 12 s |" in table


def test_training_seconds_from_metrics(tmp_path):
  lines = [{"phase": "stage_c", "step": 10, "steps_per_sec": 5.0, "time": 100.0},
           {"phase": "stage_c", "step": 20, "steps_per_sec": 5.0, "time": 102.0},
           {"phase": "joint", "step": 4, "steps_per_sec": 2.0, "time": 200.0}]
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in lines))
  assert experiments.training_seconds(tmp_path) == 2.0 + 2.0 + 2.0  # spans + lead-ins
  assert experiments.training_seconds(tmp_path / "none") is None


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
  """`--smoke` with every method, run once for the module's tests."""
  workdir = tmp_path_factory.mktemp("experiments")
  methods = experiments.parse_methods("all")
  out = experiments.run_experiments(nytaxi.get_config(), workdir, methods, seeds=[0],
                                    smoke=True)
  return workdir, methods, out


def test_smoke_scores_every_method_and_writes_tables_and_figures(smoke_run):
  workdir, methods, out = smoke_run
  assert list(out["docs"]) == methods
  for m in methods:
    doc = json.loads((workdir / m / "seed_0" / "results.json").read_text())
    assert doc["method"] == m
    assert [r["pattern"] for r in doc["results"]] == ["fixed", "random", "large_scale"]
    assert all(np.isfinite(r["mae"]) and r["n_test_slices"] == 8 for r in doc["results"])
    # Every method was scored on the identical masks.
    assert {r["mask_seed"] for r in doc["results"]} == {
        r["mask_seed"] for r in out["docs"]["interp"][0]["results"]}
  comp = (workdir / "comparison.md").read_text()
  head = next(line for line in comp.splitlines() if line.startswith("| pattern"))
  for m in ["interp", "climatology", "diffrecon"] + list(experiments.baselines()):
    assert f" {m} |" in head
  assert "diffrecon is best on" in comp and head.endswith("| diffrecon vs best other |")
  abl = (workdir / "ablations.md").read_text()
  for m in experiments.ablation_methods():
    assert f" {m} |" in abl
  assert (workdir / "comparison.csv").read_text().startswith("pattern,missing_ratio,metric,")
  for fig in ("error_vs_ratio.png", "ablations_mae.png"):
    assert (workdir / "figures" / fig).stat().st_size > 10_000
  timing = json.loads((workdir / "timing.json").read_text())
  assert set(timing) == set(methods)
  # The paper's model and the prior are labelled, and every method's budget is listed.
  assert "- diffrecon_paper: the paper's model as published" in comp
  budgets = json.loads((workdir / "budgets.json").read_text())
  assert set(budgets) == set(methods)
  for m in experiments.baselines() + ("diffrecon", "diffrecon_paper"):
    assert f"| {m} | {budgets[m]['training']} |" in comp


def test_resume_runs_nothing_again(smoke_run):
  workdir, methods, out = smoke_run
  stamps = {m: (workdir / m / "seed_0" / "results.json").stat().st_mtime_ns for m in methods}
  again = experiments.run_experiments(nytaxi.get_config(), workdir, methods, seeds=[0],
                                      smoke=True)
  assert again["timing"] == out["timing"]
  assert {m: (workdir / m / "seed_0" / "results.json").stat().st_mtime_ns
          for m in methods} == stamps


def test_phases_taken_from_diffrecon_equal_training_them(smoke_run, tmp_path):
  """noJoint starts from DiffRecon's finished stage_c and stage_f: the parameters are the ones it
  would have trained itself."""
  workdir, _, _ = smoke_run
  c = methods.method_config(experiments.smoke_config(nytaxi.get_config()),
                                "diffrecon-noJoint")
  run.run(c, str(tmp_path / "fresh"), "train")
  fresh = loading.load_for_sampling(str(tmp_path / "fresh"))[1]
  copied = loading.load_for_sampling(str(workdir / "diffrecon-noJoint"))[1]
  for a, b in zip(jax.tree_util.tree_leaves(fresh), jax.tree_util.tree_leaves(copied)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_command_line_names_a_bad_method(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "diffrecon_jax.experiments", "--config=configs/nytaxi.py",
       f"--workdir={tmp_path}", "--methods=srcnn,kriging"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "unknown method or group 'kriging'" in proc.stderr


def test_training_on_the_evaluations_own_layout(tmp_path):
  """--train_on_eval_layout: a learning method trains per pattern, a fixed pattern on exactly the
  cells its evaluation hides; the joined results say what each row was trained on."""
  out = experiments.run_experiments(nytaxi.get_config(), tmp_path, ["interp", "srcnn", "diffrecon"],
                                    seeds=[0], smoke=True, train_on_eval_layout=True)
  doc = out["docs"]["diffrecon"][0]
  assert doc["trained_on_eval_layout"] is True
  trained = [e["trained_on"] for e in doc["results"]]
  assert trained[1:] == ["random:0.4", "large_scale:0.25"] and trained[0].startswith("file:")
  layout = np.load(trained[0][len("file:"):])
  evaluated = np.load(tmp_path / "diffrecon" / "layout" / "fixed_0.4_seed0" / "masks" /
                      "fixed_0.4.npz")["mask"]
  np.testing.assert_array_equal(np.broadcast_to(layout, evaluated.shape), evaluated)
  saved = checkpoints.config_from_json(
      (tmp_path / "diffrecon" / "layout" / "train_fixed_0.4_seed0" / "config.json").read_text())
  assert tuple(saved.patterns.train) == (trained[0],)
  assert [e["trained_on"] for e in out["docs"]["srcnn"][0]["results"]] == trained
  assert "trained_on" not in out["docs"]["interp"][0]["results"][0]
  with pytest.raises(ValueError, match="use another --workdir"):
    experiments.run_experiments(nytaxi.get_config(), tmp_path, ["interp"], seeds=[0], smoke=True)
