"""The config variants (`--config=configs/nytaxi.py:VARIANTS`): `tpu` sizes the global batch from
the chips of the slice, `chips=N` only with `tpu`, unknown names refused."""
import pytest

from diffrecon_jax.configs import default, nytaxi


def test_tpu_batch_follows_the_chips_of_the_slice():
  gpu = nytaxi.get_config("gpu")
  tpu = nytaxi.get_config("tpu")
  assert tpu.train.batch_size == default.TPU_BATCH_PER_CHIP * default.TPU_CHIPS
  assert nytaxi.get_config("tpu,chips=32").train.batch_size == default.TPU_BATCH_PER_CHIP * 32
  # Otherwise the peer-sized model of `:gpu`, checkpointing in whole fused calls.
  assert tpu.model_c.to_dict() == gpu.model_c.to_dict() and tpu.train.steps_c == gpu.train.steps_c
  assert tpu.train.checkpoint_every % tpu.train.steps_per_call == 0
  assert nytaxi.get_config("tpu,paper").diffusion.prediction == "eps"


@pytest.mark.parametrize("arg, match", [("chips=4", "only goes with `tpu`"),
                                        ("tpu,chips=0", "chips=N needs a whole number"),
                                        ("tpu,chips=x", "chips=N needs a whole number"),
                                        ("gpux", "unknown config variant 'gpux'")])
def test_bad_variants_are_refused(arg, match):
  with pytest.raises(ValueError, match=match):
    nytaxi.get_config(arg)


def test_full_trains_and_calibrates_like_the_config_of_the_committed_tables():
  """`:full` is the budget the tables in docs/results ran with: the version-2 default (committed
  as tests/golden/config_v2.json), read through `migrate`, in every training and calibration
  field; only what never changes a result (compiling ahead) may differ."""
  import pathlib
  from diffrecon_jax.diffrecon import checkpoints
  golden = pathlib.Path(__file__).resolve().parent / "golden" / "config_v2.json"
  tables = checkpoints.config_from_json(golden.read_text())
  full = nytaxi.get_config("full")
  for section in ("train", "calibration"):
    want = dict(tables[section].to_dict())
    got = dict(full[section].to_dict())
    want.pop("compile_ahead", None), got.pop("compile_ahead", None)
    assert got == want, section
  assert nytaxi.get_config().train.steps_c < full.train.steps_c
