"""ST-ResNet BikeNYC (Citi Bike new/end flows, Apr-Sep 2014, hourly), 16x8 fine -> 8x4 (N=2).

The h5 file is not embedded: `--config.data.path=/path/to/NYC14_M16x8_T60_NewEnd.h5` (or its
folder). The default points at this project's shared data folder beside the checkout.
"""
from diffrecon_jax.configs import default


def get_config(arg: str = "cpu"):
  c = default.base_config()
  c.data.name = "bikenyc14"
  c.data.path = "../shared/data/BikeNYC"  # the shared data layout; override for your copy.
  c.data.scale_factor = 2   # 16x8 -> 8x4.
  c.data.history = 6        # ours: 6 h of hourly data.
  return default.apply_variant(c, arg)
