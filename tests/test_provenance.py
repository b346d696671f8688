"""Provenance: what it records, where it is kept, and the comparison of two runs."""
import json
import re
import subprocess
import sys

import pytest

from diffrecon_jax import provenance
from tests.conftest import REPO_ROOT


def test_collect_records_versions_devices_commit_and_command():
  info = provenance.collect(["prog", "--flag"], mode="evaluate")
  assert info["argv"] == ["prog", "--flag"] and info["mode"] == "evaluate"
  assert info["packages"]["jax"] and info["packages"]["flax"] and info["packages"]["numpy"]
  assert info["backend"] == "cpu" and info["device_count"] >= 1 and info["process_count"] == 1
  assert isinstance(info["device_kind"], str) and re.match(r"\d+\.\d+", info["python"])
  assert re.match(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00$", info["started"])
  json.dumps(info)  # serialisable as it is


def test_git_state_in_and_outside_a_checkout(tmp_path):
  if (REPO_ROOT / ".git").exists():
    state = provenance.git_state(REPO_ROOT)
    assert re.fullmatch(r"[0-9a-f]{40}", state["commit"]) and isinstance(state["dirty"], bool)
  assert provenance.git_state(tmp_path) == {"commit": None, "dirty": None}


def test_record_appends_runs_and_latest_reads_workdirs_and_results(tmp_path):
  provenance.record(tmp_path, {"argv": ["a"], "packages": {"jax": "1"}})
  provenance.record(tmp_path, {"argv": ["b"], "packages": {"jax": "2"}})
  runs = json.loads((tmp_path / "provenance.json").read_text())["runs"]
  assert [r["argv"] for r in runs] == [["a"], ["b"]]
  assert provenance.latest(tmp_path)["argv"] == ["b"]
  results = tmp_path / "results.json"
  results.write_text(json.dumps({"results": [], "provenance": {"argv": ["c"]}}))
  assert provenance.latest(results)["argv"] == ["c"]
  (tmp_path / "other.json").write_text("{}")
  with pytest.raises(ValueError, match="holds no provenance"):
    provenance.latest(tmp_path / "other.json")
  with pytest.raises(FileNotFoundError, match="no provenance recorded"):
    provenance.latest(tmp_path / "missing")


def test_differences_name_the_fields_that_moved_and_the_cli_prints_them(tmp_path):
  a = {"started": "x", "hostname": "h1", "packages": {"jax": "0.10.2", "flax": "1"},
       "backend": "cpu", "git": {"commit": "abc", "dirty": False}}
  b = {"started": "y", "hostname": "h2", "packages": {"jax": "0.10.3", "flax": "1"},
       "backend": "gpu", "git": {"commit": "abc", "dirty": True}}
  assert provenance.differences(a, b) == {"backend": ("cpu", "gpu"),
                                          "git.dirty": (False, True),
                                          "packages.jax": ("0.10.2", "0.10.3")}
  for name, info in (("a", a), ("b", b)):
    (tmp_path / name).mkdir()
    provenance.record(tmp_path / name, info)
  out = subprocess.run([sys.executable, "-m", "diffrecon_jax.provenance", str(tmp_path / "a"),
                        str(tmp_path / "b")], capture_output=True, text=True, cwd=REPO_ROOT,
                       check=True).stdout
  assert "packages.jax: '0.10.2' -> '0.10.3'" in out and "backend: 'cpu' -> 'gpu'" in out
  assert "started" not in out
