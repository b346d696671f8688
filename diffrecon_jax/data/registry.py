"""Dataset name -> loader, so configs can name a dataset with one string.

Every loader returns a `SpatioTemporalSeries`. `path` is accepted for every dataset and passed as
the loader's location argument (`data_dir`, `path` or `zarr_path`); "" and None mean "default"
(the embedded copy for nytaxi / nybike).
"""
from __future__ import annotations

from typing import Callable

from diffrecon_jax.data import bikenyc14, custom, ncep_air, nyc_dsan, tapbj, taxibj
from diffrecon_jax.data.series import SpatioTemporalSeries

# name -> (loader, name of its location argument)
_LOADERS: dict[str, tuple[Callable[..., SpatioTemporalSeries], str]] = {
    "nytaxi": (nyc_dsan.load_nytaxi, "data_dir"),
    "nybike": (nyc_dsan.load_nybike, "data_dir"),
    "bikenyc14": (bikenyc14.load_bikenyc14, "path"),
    "taxibj": (taxibj.load_taxibj, "data_dir"),
    "tapbj": (tapbj.load_tapbj, "path"),
    "ncep_air": (ncep_air.load_ncep_air, "zarr_path"),
    "custom": (custom.load_array, "path"),
}
DATASET_NAMES = tuple(_LOADERS)


def load_dataset(name: str, /, **kwargs) -> SpatioTemporalSeries:
  """Loads dataset `name` (one of DATASET_NAMES) with the loader's keyword arguments.

  Empty-string arguments (config defaults) are dropped so the loader's own defaults apply.
  """
  if name not in _LOADERS:
    raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
  loader, location_arg = _LOADERS[name]
  kwargs = {k: v for k, v in kwargs.items() if not (isinstance(v, str) and v == "")}
  if "path" in kwargs and location_arg != "path":
    kwargs[location_arg] = kwargs.pop("path")
  if name == "tapbj":
    kwargs.setdefault("path", None)  # so a missing path gives the manual-download message.
  return loader(**kwargs)
