"""Your own grid: any (T, H, W[, C]) array in .npy / .npz / NetCDF / Zarr, NaN = not observed.

  python -m diffrecon_jax.data.example_grid grid.nc      # a real example file to start from
  python -m diffrecon_jax.main --config=configs/custom.py --workdir=runs/mygrid \
      --config.data.path=grid.nc --config.data.variable=flow --config.data.aggregation=sum

Every option of the loader (`diffrecon_jax.data.custom.load_array`) is a field here; an unset
one ("" or None) takes the loader's default. The model, training and evaluation sections are the
CPU defaults of `configs/default.py` (`:gpu` for the full-size variant). Relative paths are taken
from the directory the command is started in.
"""
import ml_collections

from diffrecon_jax.configs import default


def get_config(arg: str = "cpu"):
  c = default.base_config()
  c.data.name = "custom"
  c.data.path = ""              # required: the .npy / .npz / .nc file or Zarr directory.
  c.data.variable = ""          # array / variable inside .npz / NetCDF / Zarr; "" = the only
                                # candidate (an error lists the names when there are several).
  c.data.aggregation = ""       # Definition 1 of the paper: "sum" for counts (a coarse cell is
                                # the total of its fine cells), "mean" for intensive quantities
                                # (PM2.5, temperature); "" = the loader's default.
  c.data.interval_minutes = ml_collections.FieldReference(None, field_type=int)  # minutes
                                # between slices; None = the loader's default; ignored when the
                                # file has a time axis (NetCDF/Zarr CF time, or `timestamps_key`).
  c.data.start = ""             # ISO time of the first slice ("2021-01-01T00:00") when the file
                                # has no time axis; "" = 1970-01-01, so calendar features are
                                # placeholders: set it for real dates.
  c.data.timestamps_key = ""    # array holding timestamps (datetime64, ISO strings, integer
                                # minutes since 1970, or CF "<unit> since <date>"); "" = the
                                # variable's CF time coordinate when there is one.
  c.data.external_key = ""      # array with (T, F) external features; "" = calendar features
                                # (day of week, slot of day) from the timestamps.
  c.data.layout = ""            # axis order of the stored array, a permutation of "THWC"
                                # ("THW" for one channel); "" = the loader's default.
  c.data.scale_factor = 2       # N: the coarse grid is (H/N, W/N); paper Table I uses 4.
  c.data.crop = "fit"           # drop the bottom/right rows/cols that N does not divide (user
                                # grids rarely divide exactly); "" = error instead.
  c.data.history = 6            # as the default config (ours: 6 past slices, CPU budget).
  return default.apply_variant(c, arg)
