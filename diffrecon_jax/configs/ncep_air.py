"""NCEP/NCAR reanalysis surface air temperature, 6-hourly 2013-2014, 25x53 -> cropped 24x52 ->
6x13 coarse (N=4, mean pooling): a dense smooth real field, the closest stand-in for TAPBJ here.

`--config.data.path` is the `air_temperature.zarr` folder (the default points at this project's
shared data folder beside the checkout), or the grid as NOAA PSL publishes it: NCEP/NCAR
Reanalysis 1 surface air temperature `air.sig995.<year>.nc`, 4x-daily (psl.noaa.gov, dataset
"NCEP-NCAR Reanalysis 1", surface), one file per year, read as downloaded (a file, a folder or a
glob such as 'DIR/air.sig995.201[34].nc'; the loader takes their `air` variable and CF time).
xarray's tutorial `air_temperature` dataset is this grid cut to 2013-2014 over North America.
"""
import ml_collections

from diffrecon_jax.configs import default


def get_config(arg: str = "cpu"):
  c = default.base_config()
  c.data.name = "ncep_air"
  c.data.path = "../shared/data/NCEP_air_temperature/air_temperature.zarr"
  c.data.daily = ml_collections.FieldReference(None, field_type=bool)  # None: the loader's
                            # default (data/ncep_air.py); True: daily means (730 slices), like
                            # TAPBJ's daily maps.
  c.data.scale_factor = 4   # paper Table I: N = 4.
  c.data.crop = "fit"       # 25x53 is not divisible by 4: drop the last row and column.
  c.data.history = 8        # ours: two days of 6-hourly maps (the daily period 4 is visible).
  return default.apply_variant(c, arg)
