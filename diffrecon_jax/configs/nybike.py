"""NYC Citi Bike in/out flows, 2016-08-01..10-29, 30 min, 14x8 fine -> 7x4 coarse (N=2). Embedded.

Variants: `cpu` (default) and `gpu` (full size), as configs/nytaxi.py.
"""
from diffrecon_jax.configs import default


def get_config(arg: str = "cpu"):
  c = default.base_config()
  c.data.name = "nybike"
  c.data.scale_factor = 2  # 14x8 -> 7x4: the only N that divides both sides.
  return default.apply_variant(c, arg)
