"""TaxiBJ (Beijing taxi in/out flows, 30 min, 32x32 fine -> 8x8 coarse, N=4): the paper's setup.

The data is not redistributable here: download the ST-ResNet release (BJ13_M32x32_T30_InOut.h5,
BJ_Meteorology.h5, BJ_Holiday.txt) and pass its folder with `--config.data.path=DIR`; the files'
sha256 are checked against the official fingerprints.
"""
import ml_collections

from diffrecon_jax.configs import default


def get_config(arg: str = "cpu"):
  c = default.base_config()
  c.data.name = "taxibj"
  c.data.path = ""          # required: the folder of the official files.
  # Loader options (data/taxibj.py); None = the loader's default, typed so that
  # --config.data.year=14 / --config.data.verify_checksum=False parse from the command line.
  c.data.year = ml_collections.FieldReference(None, field_type=int)  # None: the loader's
                            # default, the paper's TaxiBJ13 (2013-07-01..10-30); 14, 15 or 16
                            # for the other years.
  c.data.verify_checksum = ml_collections.FieldReference(None, field_type=bool)  # None: the
                            # loader checks the official sha256; False for another copy.
  c.data.scale_factor = 4   # paper Table I: 8x8 -> 32x32.
  c.data.history = 6        # ours (CPU); `gpu` variant: 12.
  return default.apply_variant(c, arg)
