"""TFDS array_record builders: prepare, then read back with tfds.data_source (no TensorFlow)."""
import sys

import numpy as np
import pytest

from diffrecon_jax.data import nyc_dsan, tfds_builders


def test_split_bounds():
  assert tfds_builders.split_bounds(10) == {"train": (0, 5), "val": (5, 7), "test": (7, 10)}
  assert tfds_builders.split_bounds(4320) == {"train": (0, 2160), "val": (2160, 3240),
                                              "test": (3240, 4320)}


@pytest.fixture(scope="module")
def nytaxi_sources(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds")
  return data_dir, tfds_builders.build_tfds("nytaxi", data_dir)


def test_nytaxi_prepare_and_read(nytaxi_sources):
  data_dir, sources = nytaxi_sources
  s = nyc_dsan.load_nytaxi()
  t = s.num_slices
  assert {k: len(v) for k, v in sources.items()} == {"train": 2160, "val": 1080, "test": 1080}
  first_test = sources["test"][0]
  np.testing.assert_array_equal(first_test["values"], s.values[3 * t // 4])
  assert first_test["values"].dtype == np.float32 and first_test["values"].shape == (16, 12, 2)
  assert first_test["timestamp"] == s.timestamps[3 * t // 4].astype(np.int64)
  np.testing.assert_array_equal(first_test["external"], s.external[3 * t // 4])
  # Time order kept inside a split (shuffling disabled).
  last_train = sources["train"][2159]
  assert last_train["timestamp"] == s.timestamps[2159].astype(np.int64)
  assert (sources["val"][1]["timestamp"] - sources["val"][0]["timestamp"]) == 30
  assert "tensorflow" not in sys.modules


def test_read_back_from_files(nytaxi_sources):
  data_dir, _ = nytaxi_sources
  sources = tfds_builders.load_tfds("nytaxi", data_dir)
  s = nyc_dsan.load_nytaxi()
  np.testing.assert_array_equal(sources["val"][5]["values"], s.values[2160 + 5])
  import tensorflow_datasets as tfds
  info = tfds.builder_from_directory(
      str(data_dir / "diffrecon_nytaxi" / tfds_builders.DATA_VERSION)).info
  assert info.metadata["aggregation"] == "sum"
  assert tuple(info.metadata["external_names"]) == s.external_names
  assert info.metadata["interval_minutes"] == 30


def test_sliced_series(tmp_path):
  s = nyc_dsan.load_nybike().slice_time(0, 10)
  sources = tfds_builders.build_tfds("nybike", tmp_path, series=s)
  assert [len(sources[k]) for k in ("train", "val", "test")] == [5, 2, 3]
  np.testing.assert_array_equal(sources["test"][2]["values"], s.values[9])


def test_a_run_reads_its_series_through_a_tfds_copy(tmp_path):
  from diffrecon_jax.configs import nybike
  from diffrecon_jax.data import pipeline
  config = nybike.get_config()
  config.data.tfds_dir = str(tmp_path / "tfds")
  first = pipeline.load_series(config)  # prepares the copy
  assert (tmp_path / "tfds" / "diffrecon_nybike" / tfds_builders.DATA_VERSION).is_dir()
  again = pipeline.load_series(config)  # reads it back
  direct = nyc_dsan.load_nybike()
  for s in (first, again):
    np.testing.assert_array_equal(s.values, direct.values)
    np.testing.assert_array_equal(s.timestamps, direct.timestamps)
    np.testing.assert_array_equal(s.external, direct.external)
    assert (s.aggregation, s.interval_minutes, s.channel_names) == (
        direct.aggregation, direct.interval_minutes, direct.channel_names)
  config.data.path = str(tmp_path / "elsewhere")  # another source: the copy is refused.
  with pytest.raises(ValueError, match="was prepared from"):
    pipeline.load_series(config)
