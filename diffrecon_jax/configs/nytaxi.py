"""NYC taxi in/out flows, 2016-01-01..03-30, 30 min, 16x12 fine -> 8x6 coarse (N=2). Embedded.

  --config=configs/nytaxi.py       the CPU variant (default; fits a 2-core laptop)
  --config=configs/nytaxi.py:gpu   the full-size variant meant for an accelerator
"""
from diffrecon_jax.configs import default


def get_config(arg: str = "cpu"):
  c = default.base_config()
  c.data.name = "nytaxi"
  c.data.scale_factor = 2  # 16x12 -> 8x6; N=4 (-> 4x3) is too coarse for a 3-level U-Net.
  return default.apply_variant(c, arg)
