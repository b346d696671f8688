"""A relative data path is saved absolute, so a later command started elsewhere finds the data."""
import os

from diffrecon_jax.configs import custom
from diffrecon_jax import run


def test_relative_data_paths_are_made_absolute_in_place(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  config = custom.get_config()
  config.data.path = "grid.nc"
  config.data.tfds_dir = ""
  run.resolve_data_paths(config)
  assert config.data.path == os.path.join(str(tmp_path), "grid.nc")
  assert config.data.tfds_dir == ""  # "" keeps its meaning (embedded data / no TFDS cache)
  run.resolve_data_paths(config)  # idempotent
  assert config.data.path == os.path.join(str(tmp_path), "grid.nc")
