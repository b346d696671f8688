"""A dataset is declared once (`registry.register`) and its options are its loader's keyword
parameters: a toy dataset registered here loads by name from a config, the config's fields
reaching the loader through its signature. The committed configs, which leave the loaders'
defaults to the loaders, give the loader arguments they gave when they restated them."""
import contextlib
import pathlib

import ml_collections
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from diffrecon_jax.configs import default
from diffrecon_jax.data import pipeline, registry
from diffrecon_jax.data.series import DataError, SpatioTemporalSeries, calendar_features

CONFIGS = pathlib.Path(default.__file__).resolve().parent


def _toy_loader(calls: list):
  """A loader of a few random hourly slices of an 8 x 6 grid; records its arguments in `calls`."""

  def load_toy(path=None, slices: int = 40, level: float = 5.0, seed: int = 0):
    """Random counts around `level`; `path`, when given, must be a readable file."""
    calls.append({"path": path, "slices": slices, "level": level, "seed": seed})
    if path is not None:
      pathlib.Path(path).read_bytes()  # a missing file raises OSError, as a real reader would.
    rng = np.random.default_rng(seed)
    values = rng.uniform(level - 1, level + 1, (slices, 8, 6, 1)).astype(np.float32)
    start = np.datetime64("2024-01-01T00:00", "m")
    timestamps = start + np.arange(slices) * np.timedelta64(60, "m")
    external, names = calendar_features(timestamps, 24)
    return SpatioTemporalSeries(
        name="toy", values=values, timestamps=timestamps, external=external,
        external_names=names, aggregation="sum", units="toy counts", interval_minutes=60,
        channel_names=("flow",))

  return load_toy


@contextlib.contextmanager
def _registered(name: str, loader, needs_path: bool):
  """`name` registered for the block only, so the other tests see the registry as it was."""
  before = registry.names()
  registry.register(name, loader, needs_path=needs_path)
  try:
    yield
  finally:
    registry.unregister(name)
    assert registry.names() == before


@pytest.fixture
def toy_calls():
  """The toy dataset "toy" (embedded: no path needed); yields the list of its loader's calls."""
  calls = []
  with _registered("toy", _toy_loader(calls), needs_path=False):
    yield calls


def _toy_config(name: str = "toy") -> ml_collections.ConfigDict:
  c = default.base_config()
  c.data.name = name
  c.data.history = 3
  c.data.slices = 48                                                # set: reaches the loader.
  c.data.level = ml_collections.FieldReference(None, field_type=float)  # unset: its default.
  c.data.colour = "blue"                                            # not a parameter: ignored.
  return c


def test_a_registered_dataset_loads_from_a_config_by_its_loader_signature(toy_calls):
  config = _toy_config()
  task = pipeline.prepare_task(config)
  # slices from the config, level and seed the loader's own defaults, colour (and the base
  # config's variable, scale_factor, ...) not passed.
  assert toy_calls == [{"path": None, "slices": 48, "level": 5.0, "seed": 0}]
  assert task.series.name == "toy" and task.series.num_slices == 48
  assert task.fine_phys.shape == (48, 8, 6, 1) and task.coarse_phys.shape == (48, 4, 3, 1)
  # The loader arguments (also the TFDS key): the options the config has a field for, an unset
  # one written out as the loader's default; `seed` has no field and is left out.
  assert registry.loader_kwargs(config.data) == {"level": 5.0, "path": None, "slices": 48}

  config.data.level = 7.0
  series = registry.load_from_config(config.data)
  assert toy_calls[-1] == {"path": None, "slices": 48, "level": 7.0, "seed": 0}
  assert 6.0 <= series.values.min() and series.values.max() <= 8.0
  assert "toy" in registry.names()


def test_a_dataset_that_is_not_embedded_needs_a_path(tmp_path):
  calls = []
  with _registered("toy_files", _toy_loader(calls), needs_path=True):
    config = _toy_config("toy_files")
    for load in (lambda: registry.load_from_config(config.data),
                 lambda: registry.load_dataset("toy_files", path="")):
      with pytest.raises(DataError, match=r"'toy_files' is not embedded: set --config\.data\."
                                          r"path to its file or folder"):
        load()
    assert not calls  # refused before the loader runs.
    config.data.path = str(tmp_path / "absent.bin")
    with pytest.raises(DataError, match=f"{tmp_path / 'absent.bin'}: not a readable 'toy_files' "
                                        f"dataset file \\(FileNotFoundError"):
      registry.load_from_config(config.data)
    (tmp_path / "toy.bin").write_bytes(b"")
    config.data.path = str(tmp_path / "toy.bin")
    assert registry.load_from_config(config.data).num_slices == 48
    assert calls[-1]["path"] == str(tmp_path / "toy.bin")


def test_unknown_names_and_unset_required_options_say_what_to_set(toy_calls):
  with pytest.raises(DataError, match=r"unknown dataset 'toyy' \(--config\.data\.name\); valid "
                                      r"names: nytaxi, .*custom, toy"):
    registry.load_from_config(_toy_config("toyy").data)

  def load_sized(path=None, *, size: int):
    raise AssertionError("not called without its size")

  with _registered("sized", load_sized, needs_path=False):
    with pytest.raises(DataError, match=r"'sized' needs --config\.data\.size"):
      registry.loader_kwargs(_toy_config("sized").data)


def test_register_refuses_taken_names_and_loaders_it_cannot_feed(toy_calls):
  with pytest.raises(ValueError, match="'toy' is already registered"):
    registry.register("toy", _toy_loader([]), needs_path=False)
  with pytest.raises(ValueError, match="takes its file or folder as `path`"):
    registry.register("no_path", lambda folder=None: None, needs_path=False)
  with pytest.raises(ValueError, match=r"\['crop'\] are config.data fields of the pipeline"):
    registry.register("cropped", lambda path=None, crop=None: None, needs_path=False)
  assert "no_path" not in registry.names() and "cropped" not in registry.names()


def _parsed(config_file: str, *overrides: str) -> ml_collections.ConfigDict:
  """The config of `configs/<config_file>` with command-line overrides, as `main` parses it."""
  argv = ["main", f"--config={CONFIGS / config_file}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", flag_values=values, sys_argv=argv)
  values(argv)
  return values.config


# Each committed config's loader arguments with only --config.data.path given: the loaders'
# defaults, the same dicts as when the configs restated them (so prepared TFDS copies, keyed on
# them, stay valid); then the options users set on the command line, typed by the config.
@pytest.mark.parametrize("config_file, overrides, expected", [
    ("taxibj.py", (), {"year": 13, "verify_checksum": True}),
    ("taxibj.py", ("--config.data.year=14", "--config.data.verify_checksum=False"),
     {"year": 14, "verify_checksum": False}),
    ("ncep_air.py", (), {"daily": False}),
    ("ncep_air.py", ("--config.data.daily=True",), {"daily": True}),
    ("tapbj.py", (), {"variable": "pm25"}),
    ("tapbj.py", ("--config.data.variable=PM2_5",), {"variable": "PM2_5"}),
    ("custom.py", (), {"variable": None, "aggregation": "sum", "interval_minutes": 60,
                       "start": None, "timestamps_key": None, "external_key": None,
                       "layout": "THWC"}),
    ("custom.py", ("--config.data.variable=flow", "--config.data.aggregation=mean",
                   "--config.data.interval_minutes=1440", "--config.data.start=2021-01-01",
                   "--config.data.layout=THW"),
     {"variable": "flow", "aggregation": "mean", "interval_minutes": 1440,
      "start": "2021-01-01", "timestamps_key": None, "external_key": None, "layout": "THW"}),
    ("bikenyc14.py", (), {}),
])
def test_committed_configs_give_the_loader_arguments(config_file, overrides, expected):
  config = _parsed(config_file, "--config.data.path=/data/set", *overrides)
  kwargs = registry.loader_kwargs(config.data)
  assert kwargs == {"path": "/data/set", **expected}
  assert list(kwargs) == sorted(kwargs)
  for key, value in expected.items():
    assert type(kwargs[key]) is type(value), key


@pytest.mark.parametrize("config_file", ["nytaxi.py", "nybike.py"])
def test_embedded_configs_pass_no_path(config_file):
  assert registry.loader_kwargs(_parsed(config_file).data) == {"path": None}


def test_ncep_air_loads_through_its_config(shared_data_dir):
  store = shared_data_dir / "NCEP_air_temperature" / "air_temperature.zarr"
  six_hourly = registry.load_from_config(_parsed("ncep_air.py", f"--config.data.path={store}").data)
  assert six_hourly.num_slices == 2920 and six_hourly.interval_minutes == 360
  daily = registry.load_from_config(
      _parsed("ncep_air.py", f"--config.data.path={store}", "--config.data.daily=True").data)
  assert daily.num_slices == 730 and daily.interval_minutes == 1440
