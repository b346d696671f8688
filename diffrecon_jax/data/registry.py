"""Dataset name -> loader, and the one place that maps a config's `data` section to its arguments.

Every loader returns a `SpatioTemporalSeries` and takes its file or folder as `path`; "" and
None mean "default" (the embedded copy for nytaxi / nybike). User paths are resolved to absolute
paths here, so a relative `--config.data.path` means "relative to the directory the command was
started in".
"""
from __future__ import annotations

import os
from typing import Callable

from diffrecon_jax.data import bikenyc14, custom, ncep_air, nyc_dsan, tapbj, taxibj
from diffrecon_jax.data.series import DataError, SpatioTemporalSeries

# name -> loader
_LOADERS: dict[str, Callable[..., SpatioTemporalSeries]] = {
    "nytaxi": nyc_dsan.load_nytaxi,
    "nybike": nyc_dsan.load_nybike,
    "bikenyc14": bikenyc14.load_bikenyc14,
    "taxibj": taxibj.load_taxibj,
    "tapbj": tapbj.load_tapbj,
    "ncep_air": ncep_air.load_ncep_air,
    "custom": custom.load_array,
}
DATASET_NAMES = tuple(_LOADERS)
# Datasets without an embedded copy: a path is required.
_NEEDS_PATH = ("bikenyc14", "taxibj", "ncep_air", "custom")


def load_dataset(name: str, /, **kwargs) -> SpatioTemporalSeries:
  """Loads dataset `name` (one of DATASET_NAMES) with the loader's keyword arguments.

  Empty-string arguments (config defaults) are dropped so the loader's own defaults apply.
  """
  if name not in _LOADERS:
    raise DataError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
  loader = _LOADERS[name]
  kwargs = {k: v for k, v in kwargs.items() if not (isinstance(v, str) and v == "")}
  if name == "tapbj":
    kwargs.setdefault("path", None)  # so a missing path gives the manual-download message.
  try:
    return loader(**kwargs)
  except DataError:
    raise
  except (OSError, ValueError, KeyError, EOFError) as e:
    # A truncated, pickled or mislabelled file reaches the readers' own errors: name the file
    # and what it must be, in one line.
    where = kwargs.get("path") or "the default location"
    first = (str(e).strip().splitlines() or [""])[0][:200]
    raise DataError(f"{where}: not a readable {name!r} dataset file ({type(e).__name__}: "
                    f"{first}); check the file, its format and extension (see the loader's "
                    f"docstring: diffrecon_jax/data/{loader.__module__.rsplit('.', 1)[-1]}.py)"
                    ) from None


def absolute_path(path) -> str | None:
  """A user path made absolute against the current directory ("" / None stay None)."""
  if path is None or str(path) == "":
    return None
  return os.path.abspath(os.path.expanduser(str(path)))


def loader_kwargs(data) -> dict:
  """The loader arguments of a config's `data` section (`configs/*.py`), by dataset name.

  Only the fields a dataset's loader understands are read; the others keep their defaults.
  """
  name = data.name
  path = absolute_path(data.get("path", ""))
  if name in _NEEDS_PATH and path is None:
    raise DataError(f"dataset {name!r} is not embedded: set --config.data.path to its file or "
                    "folder (see the dataset's module docstring for where to get it)")
  if name == "taxibj":
    return {"path": path, "year": int(data.get("year", 13)),
            "verify_checksum": bool(data.get("verify_checksum", True))}
  if name == "ncep_air":
    return {"path": path, "daily": bool(data.get("daily", False))}
  if name == "tapbj":
    return {"path": path, "variable": data.get("variable", "") or "pm25"}
  if name == "custom":
    return {"path": path, "variable": data.get("variable", "") or None,
            "aggregation": data.get("aggregation", "sum"),
            "interval_minutes": int(data.get("interval_minutes", 60)),
            "start": data.get("start", "") or None,
            "timestamps_key": data.get("timestamps_key", "") or None,
            "external_key": data.get("external_key", "") or None,
            "layout": data.get("layout", "") or "THWC"}
  return {"path": path}


def load_from_config(data) -> SpatioTemporalSeries:
  """Loads the dataset a config's `data` section names."""
  if data.name not in _LOADERS:
    raise DataError(f"unknown dataset {data.name!r} (--config.data.name); valid names: "
                    f"{', '.join(DATASET_NAMES)}")
  return load_dataset(data.name, **loader_kwargs(data))
