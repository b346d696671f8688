"""TFDS builders (array_record) for the registry datasets, readable without TensorFlow.

One example per time slice: `values` (H, W, C) float32, `timestamp` int64 (minutes since
1970-01-01), `external` (F,) float32. Splits are chronological 2:1:1:
the same boundaries as `pipeline.Split`; shuffling is disabled so example i of a
split is slice (split start + i). The series metadata (names, aggregation, units, interval) is
stored in the dataset info.

`tfds.data_source` and `GeneratorBasedBuilder.download_and_prepare(file_format="array_record")`
run without TensorFlow in tensorflow-datasets 4.9 (examples are encoded/decoded with numpy).

How a run uses it: `--config.data.tfds_dir=DIR` makes `pipeline.load_series` call
`load_or_prepare`, which writes the dataset there from its loader on first use and reads it back
from the array_record files on every later run (one copy in a fast, random-access format, e.g. on
a TPU VM's local disk; the original files are then no longer needed). The loader arguments are
stored with the copy, so a directory prepared from another file is refused, not silently read.
The builder class is made per dataset (name `diffrecon_<dataset>`) and not registered, because
its shapes depend on the loaded series; prepared data is read back from files by name with
`tfds.data_source("diffrecon_<dataset>", data_dir=...)` or `load_tfds`.
"""
from __future__ import annotations

import functools
import json
import pathlib
from typing import Optional, Union

import numpy as np
import tensorflow_datasets as tfds

from diffrecon_jax.data import registry
from diffrecon_jax.data.series import DataError, SpatioTemporalSeries
from diffrecon_jax.data.splits import Split

DATA_VERSION = "1.0.0"


def split_bounds(t: int) -> dict:
  """Chronological 2:1:1 split of T slices -> {split: (start, stop)} (the task's own split)."""
  split = Split.chronological(t)
  return {name: split.range(name) for name in ("train", "val", "test")}


class SeriesBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Writes a `SpatioTemporalSeries` as one example per time slice."""

  VERSION = tfds.core.Version(DATA_VERSION)
  RELEASE_NOTES = {DATA_VERSION: "One example per slice; chronological 2:1:1 splits."}

  def __init__(self, *, series: SpatioTemporalSeries, loader_kwargs: str = "", **kwargs):
    self._series = series
    self._loader_kwargs = loader_kwargs  # JSON of the loader arguments the series came from.
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    s = self._series
    h, w = s.fine_shape
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{s.name}: {s.units}; source: {s.source}",
        features=tfds.features.FeaturesDict({
            "values": tfds.features.Tensor(shape=(h, w, s.channels), dtype=np.float32),
            "timestamp": tfds.features.Scalar(dtype=np.int64),
            "external": tfds.features.Tensor(shape=(s.external.shape[1],), dtype=np.float32),
        }),
        disable_shuffling=True,  # keep time order within each split.
        metadata=tfds.core.MetadataDict(
            name=s.name, external_names=list(s.external_names),
            channel_names=list(s.channel_names), aggregation=s.aggregation, units=s.units,
            interval_minutes=int(s.interval_minutes), num_slices=int(s.num_slices),
            source=s.source, loader_kwargs=self._loader_kwargs),
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # data comes from the loader, not from a download.
    return {split: self._generate_examples(start, stop)
            for split, (start, stop) in split_bounds(self._series.num_slices).items()}

  def _generate_examples(self, start: int, stop: int):
    s = self._series
    minutes = s.timestamps.astype("datetime64[m]").astype(np.int64)
    for i in range(start, stop):
      yield i, {"values": s.values[i].astype(np.float32), "timestamp": minutes[i],
                "external": s.external[i].astype(np.float32)}


@functools.cache
def builder_class(name: str) -> type:
  """The (unregistered) builder class of dataset `name`; its TFDS name is `diffrecon_<name>`."""
  cls_name = "Diffrecon" + "".join(p.capitalize() for p in name.split("_"))
  return type(cls_name, (SeriesBuilder,), {"name": f"diffrecon_{name}"},
              skip_registration=True)


def build_tfds(name: str, data_dir: Union[str, pathlib.Path],
               series: Optional[SpatioTemporalSeries] = None, **loader_kwargs) -> dict:
  """Prepares dataset `name` as array_record under `data_dir` and returns its data sources.

  Args:
    name: registry name (`registry.names()`).
    data_dir: TFDS data dir; files go to <data_dir>/diffrecon_<name>/<DATA_VERSION>/.
    series: an already loaded (e.g. sliced) series to write instead of calling the loader.
    **loader_kwargs: passed to `registry.load_dataset`.

  Returns:
    {"train", "val", "test"} -> random-access data sources; element i is a dict with
    values (H, W, C) float32, timestamp int64, external (F,) float32.
  """
  if series is None:
    series = registry.load_dataset(name, **loader_kwargs)
  builder = builder_class(name)(series=series, data_dir=str(data_dir),
                                file_format="array_record")
  builder.download_and_prepare()
  return builder.as_data_source()


def load_tfds(name: str, data_dir: Union[str, pathlib.Path]) -> dict:
  """Data sources of an already prepared dataset, read from files (no loader, no TF)."""
  return tfds.data_source(f"diffrecon_{name}", data_dir=str(data_dir))


def series_from_sources(sources: dict, metadata: dict) -> SpatioTemporalSeries:
  """The `SpatioTemporalSeries` stored in prepared data sources (train, val, test in order)."""
  examples = [src[i] for split in ("train", "val", "test") for src in [sources[split]]
              for i in range(len(src))]
  if not examples:
    raise DataError(f"{metadata.get('name')}: the prepared TFDS copy holds no slice")
  return SpatioTemporalSeries(
      name=str(metadata["name"]),
      values=np.stack([e["values"] for e in examples]).astype(np.float32),
      timestamps=np.array([e["timestamp"] for e in examples], np.int64).astype("datetime64[m]"),
      external=np.stack([e["external"] for e in examples]).astype(np.float32).reshape(
          len(examples), -1),
      external_names=tuple(metadata["external_names"]), aggregation=str(metadata["aggregation"]),
      units=str(metadata["units"]), interval_minutes=int(metadata["interval_minutes"]),
      channel_names=tuple(metadata["channel_names"]), source=str(metadata.get("source", "")))


def load_or_prepare(data, tfds_dir: Union[str, pathlib.Path]) -> SpatioTemporalSeries:
  """The series of a config's `data` section, through a TFDS copy under `tfds_dir`.

  The first call loads the dataset with its loader (`registry.load_from_config`) and prepares
  it; later calls read the array_record files only. A copy prepared from other loader
  arguments (another file, year, variable...) is an error naming both.
  """
  # The key: what the loader runs with, defaults written out (`registry.loader_kwargs`), so a
  # config that leaves an option unset and one that states its default share a copy.
  kwargs = json.dumps(registry.loader_kwargs(data), sort_keys=True, default=str)
  version_dir = pathlib.Path(tfds_dir) / f"diffrecon_{data.name}" / DATA_VERSION
  if not version_dir.is_dir():
    series = registry.load_from_config(data)
    builder = builder_class(data.name)(series=series, loader_kwargs=kwargs,
                                       data_dir=str(tfds_dir), file_format="array_record")
    builder.download_and_prepare()
  builder = tfds.builder_from_directory(str(version_dir))
  stored = builder.info.metadata.get("loader_kwargs", "")
  if stored != kwargs:
    raise DataError(f"{version_dir} was prepared from {stored or 'unknown loader arguments'}, "
                    f"not from {kwargs}; use another --config.data.tfds_dir or delete it")
  return series_from_sources(builder.as_data_source(), builder.info.metadata)
