"""TAPBJ: daily 1 km PM2.5 over Beijing 2014-2017 (TAP), paper Table I: 32x32 fine -> 8x8 (N=4).

TAP data cannot be redistributed: register at http://tapdata.org.cn, export the Beijing daily PM2.5
grids to NetCDF, Zarr or .npy with shape (T, H, W), then
  --config.data.path=/path/to/tap_beijing.nc --config.data.variable=pm25
Without a path the run stops with these instructions.
"""
from diffrecon_jax.configs import default


def get_config(arg: str = "cpu"):
  c = default.base_config()
  c.data.name = "tapbj"
  c.data.path = ""          # required: the user's TAP export.
  c.data.variable = ""      # PM2.5 variable inside NetCDF/Zarr/npz; "" = the loader's name
                            # for it (data/tapbj.py).
  c.data.scale_factor = 4   # paper Table I: 8x8 -> 32x32.
  c.data.crop = "fit"       # user grids rarely divide by 4 exactly.
  c.data.history = 7        # ours: one week of daily maps.
  return default.apply_variant(c, arg)
