"""Datasets by name: each is declared once (`register`), and a config's `data` section reaches
its loader through the loader's own signature.

Every loader returns a `SpatioTemporalSeries` and takes its file or folder as `path`; "" and
None mean "default" (the embedded copy for nytaxi / nybike). Its other keyword parameters are its
options: a `config.data` field named like one is passed to it, an unset field (None, or "") lets
the loader's default apply, and the fields it does not take (the pipeline's, another dataset's)
are ignored. So an option's default is written once, in the loader, and a new option needs no
edit here. User paths are resolved to absolute paths here, so a relative `--config.data.path`
means "relative to the directory the command was started in".
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Callable

from diffrecon_jax.data import bikenyc14, custom, ncep_air, nyc_dsan, tapbj, taxibj
from diffrecon_jax.data.series import DataError, SpatioTemporalSeries

# `config.data` fields the pipeline reads itself (pipeline.load_series / prepare_task): a loader
# parameter named like one would be handed the pipeline's value, so `register` refuses it.
PIPELINE_FIELDS = ("scale_factor", "crop", "history", "tfds_dir", "gap_rule")
# Loader parameters never filled from an option field: `path` is resolved here, and
# `config.data.name` is the registry name, not the series name some loaders take.
_NOT_OPTIONS = ("path", "name")


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """One dataset as the registry knows it.

  Attributes:
    name: the registry name (`config.data.name`).
    loader: returns the `SpatioTemporalSeries`; takes `path` and the dataset's options.
    needs_path: True when no copy is embedded, so a missing path is an error before loading.
    download: how to get the data, appended to that error ("" = see the loader's docstring).
  """
  name: str
  loader: Callable[..., SpatioTemporalSeries]
  needs_path: bool
  download: str = ""


_DATASETS: dict[str, DatasetSpec] = {}


def register(name: str, loader: Callable[..., SpatioTemporalSeries], *, needs_path: bool,
             download: str = "") -> DatasetSpec:
  """Declares dataset `name`: after this, `--config.data.name=<name>` loads it.

  Refuses a taken name, a loader without a `path` parameter and one with a parameter named like
  a pipeline field (PIPELINE_FIELDS), which would receive the pipeline's value.
  """
  if name in _DATASETS:
    raise ValueError(f"dataset {name!r} is already registered (loader "
                     f"{_DATASETS[name].loader.__module__}.{_DATASETS[name].loader.__name__})")
  params = inspect.signature(loader).parameters
  if "path" not in params:
    raise ValueError(f"{loader.__name__}: a dataset loader takes its file or folder as `path`")
  clash = sorted(set(params) & set(PIPELINE_FIELDS))
  if clash:
    raise ValueError(f"{loader.__name__}: parameter(s) {clash} are config.data fields of the "
                     f"pipeline; rename them")
  declared = DatasetSpec(name, loader, needs_path, download)
  _DATASETS[name] = declared
  return declared


def unregister(name: str) -> None:
  """Removes dataset `name` (tests register toy datasets and remove them again)."""
  del _DATASETS[name]


def names() -> tuple:
  """The registered dataset names, in order of registration."""
  return tuple(_DATASETS)


# The package's datasets, one declaration each; their options are their loaders' parameters.
register("nytaxi", nyc_dsan.load_nytaxi, needs_path=False)
register("nybike", nyc_dsan.load_nybike, needs_path=False)
register("bikenyc14", bikenyc14.load_bikenyc14, needs_path=True)
register("taxibj", taxibj.load_taxibj, needs_path=True, download=taxibj.MANUAL_DOWNLOAD)
register("tapbj", tapbj.load_tapbj, needs_path=True, download=tapbj.MANUAL_DOWNLOAD)
register("ncep_air", ncep_air.load_ncep_air, needs_path=True)
register("custom", custom.load_array, needs_path=True)


def spec(name: str, flag: str = "") -> DatasetSpec:
  """The declaration of dataset `name`; an unknown name is an error listing the valid ones."""
  if name not in _DATASETS:
    raise DataError(f"unknown dataset {name!r}{flag}; valid names: {', '.join(names())}")
  return _DATASETS[name]


def options(loader: Callable) -> tuple:
  """The loader's options: the `inspect.Parameter`s that can be passed by keyword, less
  `path` and `name` (not `**kwargs`: what it forwards is not filled from the config)."""
  kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
  return tuple(p for p in inspect.signature(loader).parameters.values()
               if p.kind in kinds and p.name not in _NOT_OPTIONS)


def _unset(value) -> bool:
  """None or "": the config leaves the option to the loader's default."""
  return value is None or (isinstance(value, str) and value == "")


def _check_path(dataset: DatasetSpec, path) -> None:
  """A dataset with no embedded copy needs a path: say which flag sets it, and where to get
  the data."""
  if dataset.needs_path and _unset(path):
    where = dataset.download or (f"See the docstring of {dataset.loader.__module__} for where "
                                 f"to get it.")
    raise DataError(f"dataset {dataset.name!r} is not embedded: set --config.data.path to its "
                    f"file or folder. {where}")


def load_dataset(name: str, /, **kwargs) -> SpatioTemporalSeries:
  """Loads dataset `name` (one of `names()`) with the loader's keyword arguments.

  Unset arguments (None, "": config defaults) are dropped so the loader's own defaults apply.
  """
  dataset = spec(name)
  kwargs = {k: v for k, v in kwargs.items() if not _unset(v)}
  _check_path(dataset, kwargs.get("path"))
  try:
    return dataset.loader(**kwargs)
  except DataError:
    raise
  except (OSError, ValueError, KeyError, EOFError) as e:
    # A truncated, pickled or mislabelled file reaches the readers' own errors: name the file
    # and what it must be, in one line.
    where = kwargs.get("path") or "the default location"
    first = (str(e).strip().splitlines() or [""])[0][:200]
    raise DataError(f"{where}: not a readable {name!r} dataset file ({type(e).__name__}: "
                    f"{first}); check the file, its format and extension (see the loader's "
                    f"docstring: {dataset.loader.__module__}.{dataset.loader.__name__})"
                    ) from None


def absolute_path(path) -> str | None:
  """A user path made absolute against the current directory ("" / None stay None)."""
  if path is None or str(path) == "":
    return None
  return os.path.abspath(os.path.expanduser(str(path)))


def loader_kwargs(data) -> dict:
  """The loader arguments of a config's `data` section (`configs/*.py`), sorted by name.

  `path` (absolute, or None) and every option of the loader that `data` has a field for: its
  value, or the loader's default when the field is unset. The defaults are written out (read from
  the signature, not restated) so the dict says what the loader runs with whether a config
  states a default or leaves it unset: it is also the key of a prepared TFDS copy
  (`tfds_builders.load_or_prepare`). An option the config has no field for always runs with its
  default and is left out, so a copy prepared before the loader gained it keeps its key.
  """
  dataset = spec(data.name, " (--config.data.name)")
  path = absolute_path(data.get("path"))
  _check_path(dataset, path)
  kwargs = {"path": path}
  for param in options(dataset.loader):
    given = param.name in data and not _unset(data.get(param.name))
    if given:
      kwargs[param.name] = data.get(param.name)
    elif param.default is inspect.Parameter.empty:
      raise DataError(f"dataset {dataset.name!r} needs --config.data.{param.name} (see the "
                      f"docstring of {dataset.loader.__module__}.{dataset.loader.__name__})")
    elif param.name in data:
      kwargs[param.name] = param.default
  return dict(sorted(kwargs.items()))


def load_from_config(data) -> SpatioTemporalSeries:
  """Loads the dataset a config's `data` section names."""
  return load_dataset(data.name, **loader_kwargs(data))
