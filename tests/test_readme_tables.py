"""The README's result tables equal what their committed results files render
(`diffrecon_jax.readme_tables`), and a changed number or a missing file is caught."""
import json

import pytest

from diffrecon_jax import readme_tables


def test_every_readme_table_equals_its_results_files():
  text = readme_tables.README.read_text()
  names = set(readme_tables.marked(text))
  # The main tables and the comparisons must be marked, so they cannot drift unchecked.
  assert {"nytaxi_main", "nybike_main", "nytaxi_comparison", "nybike_comparison"} <= names
  assert readme_tables.differing(text) == []


def test_a_changed_number_is_caught_and_rewritten():
  text = readme_tables.README.read_text()
  row = next(line for line in readme_tables.TABLES["nytaxi_main"]().splitlines()
             if line.startswith("| fixed | 0.8 |"))
  cells = row.split(" | ")
  cells[3] = "1.000"  # the prior's MAE, changed by hand
  broken = text.replace(row, " | ".join(cells))
  assert broken != text
  assert readme_tables.differing(broken) == ["nytaxi_main"]
  assert readme_tables.rewrite(broken) == text


def test_main_table_reads_the_files(tmp_path, monkeypatch):
  monkeypatch.setattr(readme_tables, "RESULTS", tmp_path)
  entry = {"pattern": "random", "missing_ratio": 0.4, "mae": 2.0, "rmse": 3.0,
           "completion_mae": 4.0, "crps": 1.5, "coverage_50": 0.5, "coverage_90": 0.9,
           "coverage_90_hidden": 0.88, "spread_skill": 1.0, "coverage_90_raw": 0.4,
           "spread_skill_raw": 0.3}
  for name, mae in (("results", 2.0), ("prior", 2.5), ("climatology", 3.0), ("interp", 9.0)):
    (tmp_path / f"g_{name}.json").write_text(json.dumps({"results": [{**entry, "mae": mae}]}))
  row = readme_tables.main_table("g").splitlines()[2]
  assert row.startswith("| random | 0.4 | **2.000** | 2.500 | 3.000 | 9.00 |")
  assert "| 0.50 |" in row  # the CRPS over the climatology's MAE: 1.5 / 3.0
  (tmp_path / "g_prior.json").unlink()
  with pytest.raises(FileNotFoundError, match="g_prior.json"):
    readme_tables.main_table("g")


def test_unknown_table_name_is_an_error():
  with pytest.raises(ValueError, match="no renderer"):
    readme_tables.marked("<!-- table:nope -->\n| a |\n\n<!-- /table -->")


def test_copied_table_takes_one_table_of_an_experiments_file(tmp_path, monkeypatch):
  """comparison.md holds the comparison, then the budgets: each is copied alone, methods named
  as in the README."""
  monkeypatch.setattr(readme_tables, "RESULTS", tmp_path)
  (tmp_path / "c.md").write_text(
      "# comparison\n\n| pattern | srcnn | diffrecon |\n|---|---|---|\n| fixed | 2 | 1 |\n\n"
      "Budgets:\n\n| method | training | batch | wall time |\n|---|---|---|---|\n"
      "| srcnn | 10 steps | 32 | 5 s |\n| diffrecon_paper | 3 steps | 16 | 9 s |\n")
  assert readme_tables.copied_table("c.md") == (
      "| pattern | SRCNN | DiffRecon |\n|---|---|---|\n| fixed | 2 | 1 |\n")
  budgets = readme_tables.copied_table("c.md", 1).splitlines()
  assert budgets[2:] == ["| SRCNN | 10 steps | 32 | 5 s |",
                         "| DiffRecon (paper) | 3 steps | 16 | 9 s |"]
