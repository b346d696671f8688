"""Typed settings (diffrecon/settings.py): one source for every default (configs/default.py),
a clear error for a missing field, and `migrate` for configs saved by earlier versions."""
import dataclasses
import json
import pathlib

import ml_collections
import pytest

from diffrecon_jax.configs import default
from diffrecon_jax.diffrecon import checkpoints
from diffrecon_jax.diffrecon import settings

GOLDEN_CONFIG = pathlib.Path(__file__).resolve().parent / "golden" / "config_today.json"
# Today's config as version 2 wrote it (before the training budget's schedule fields).
GOLDEN_CONFIG_V2 = pathlib.Path(__file__).resolve().parent / "golden" / "config_v2.json"
GOLDEN_CONFIG_V3 = pathlib.Path(__file__).resolve().parent / "golden" / "config_v3.json"
RECORDS = (settings.DiffusionSettings, settings.PriorSettings, settings.LossSettings,
           settings.ModelSettings, settings.TrainSettings, settings.SamplingSettings,
           settings.CalibrationSettings)


def _as_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json())


def _delete(config: ml_collections.ConfigDict, path: str) -> None:
  *sections, key = path.split(".")
  node = config
  for name in sections:
    node = node[name]
  del node[key]


def test_default_config_is_the_current_version():
  assert default.get_config().config_version == settings.CONFIG_VERSION


@pytest.mark.parametrize("text", [default.get_config().to_json(), GOLDEN_CONFIG.read_text()],
                         ids=["written_now", "committed"])
def test_todays_config_passes_through_migrate_unchanged(text):
  given = checkpoints.config_from_json(text)  # config_from_json migrates
  assert _as_dict(settings.migrate(given)) == json.loads(text)
  assert settings.migrate(given).to_json() == given.to_json()


def test_a_config_without_the_newer_fields_migrates_to_the_old_behaviour():
  config = checkpoints.config_from_json(GOLDEN_CONFIG.read_text())
  del config["config_version"]  # saved before the field existed: version 1
  for _, path, _ in settings.MIGRATIONS:
    _delete(config, path)
  migrated = settings.migrate(config)
  assert migrated.config_version == settings.CONFIG_VERSION
  for _, path, old in settings.MIGRATIONS:
    assert settings.read(migrated, path) == old, path
  # What the old behaviour was, in the typed records.
  model = settings.ModelSettings.from_config(migrated)
  assert not model.prior.coarse_residual and not model.prior.uses_prior
  assert model.diffusion.prediction == "eps" and model.loss.point_fraction == 0.0
  sampling = settings.SamplingSettings.from_config(migrated)
  assert (sampling.point, sampling.ensemble) == ("median", "shared_completion")
  assert not settings.CalibrationSettings.from_config(migrated).enabled
  # Every other field is kept as saved.
  kept = _as_dict(migrated)
  today = json.loads(GOLDEN_CONFIG.read_text())
  assert kept["train"]["steps_c"] == today["train"]["steps_c"]
  assert kept["model_c"]["d_model"] == today["model_c"]["d_model"]


def test_a_version_2_config_gets_the_old_schedule_and_keeps_everything_else():
  saved = json.loads(GOLDEN_CONFIG_V2.read_text())
  assert saved["config_version"] == 2
  migrated = _as_dict(checkpoints.config_from_json(GOLDEN_CONFIG_V2.read_text()))
  assert migrated["config_version"] == settings.CONFIG_VERSION
  # What version 2 computed: constant rates, the plain EMA, every validation slice.
  assert migrated["train"]["lr_schedule"] == "constant"
  assert migrated["train"]["ema_warmup"] is False
  assert migrated["calibration"]["val_stride"] == 1
  # A field that never changed a result comes from today's config.
  assert migrated["train"]["compile_ahead"] is True
  for section, fields in saved.items():
    if isinstance(fields, dict):
      for key, value in fields.items():
        assert migrated[section][key] == value, f"{section}.{key}"


def test_migrate_keeps_the_fields_an_old_config_has():
  config = default.get_config()
  del config["config_version"]
  config.diffusion.coarse_residual = True   # a version-1 config that had the field
  del config.diffusion["prediction"]
  migrated = settings.migrate(config)
  assert migrated.diffusion.coarse_residual is True
  assert migrated.diffusion.prediction == "eps"


def test_a_missing_section_is_added_whole():
  config = default.get_config()
  del config["config_version"]
  del config["calibration"]
  del config["climatology"]
  migrated = settings.migrate(config)
  assert _as_dict(migrated.calibration) == {"enabled": False, "spread_rule": "spread_skill",
                                            "val_slices": 0, "val_stride": 1}
  assert migrated.climatology.table == "auto"


def test_a_config_of_a_newer_version_is_refused():
  config = default.get_config()
  config.config_version = settings.CONFIG_VERSION + 1
  with pytest.raises(ValueError, match="newer"):
    settings.migrate(config)


@pytest.mark.parametrize("record, path", [
    (settings.PriorSettings, "diffusion.coarse_residual"),
    (settings.DiffusionSettings, "diffusion.prediction"),
    (settings.LossSettings, "train.point_fraction"),
    (settings.TrainSettings, "train.adam_eps"),
    (settings.SamplingSettings, "sampling.point"),
    (settings.CalibrationSettings, "calibration.enabled"),
    (settings.CalibrationSettings, "eval.max_slices"),
])
def test_from_config_names_a_missing_field(record, path):
  config = default.get_config()
  _delete(config, path)
  with pytest.raises(settings.MissingField, match=f"config has no {path}"):
    record.from_config(config)


@pytest.mark.parametrize("path, allowed", [
    ("diffusion.prediction", settings.PREDICTIONS),
    ("diffusion.fine_base", settings.FINE_BASES),
    ("diffusion.residual_scaling", settings.RESIDUAL_SCALINGS),
    ("train.point_loss", settings.POINT_LOSSES),
    ("sampling.point", settings.POINTS),
    ("sampling.sampler", settings.SAMPLERS),
])
def test_from_config_checks_the_choices(path, allowed):
  config = default.get_config()
  *sections, key = path.split(".")
  config[sections[0]][key] = "nonsense"
  record = settings.SamplingSettings if path.startswith("sampling") else settings.ModelSettings
  with pytest.raises(ValueError, match=path):
    record.from_config(config)


@pytest.mark.parametrize("stride", [0, -2])
def test_a_calibration_stride_below_one_is_refused_by_name(stride):
  config = default.get_config()
  config.calibration.val_stride = stride
  with pytest.raises(ValueError, match=f"calibration.val_stride must be >= 1.*got {stride}"):
    settings.CalibrationSettings.from_config(config)
  config.calibration.val_stride = 2
  assert settings.CalibrationSettings.from_config(config).val_stride == 2


def _flat(record) -> dict:
  out = {}
  for f in dataclasses.fields(record):
    value = getattr(record, f.name)
    out.update(_flat(value) if dataclasses.is_dataclass(value) else {f.name: value})
  return out


# Record field -> config field where the names differ (or the section is not the record's).
_CONFIG_NAME = {"slot_sigma_minutes": "diffusion.prior_slot_sigma_minutes",
                "cross_fit_folds": "diffusion.prior_cross_fit_folds",
                "max_slices": "eval.max_slices"}
_SECTION = {settings.DiffusionSettings: "diffusion", settings.PriorSettings: "diffusion",
            settings.LossSettings: "train", settings.TrainSettings: "train",
            settings.SamplingSettings: "sampling", settings.CalibrationSettings: "calibration"}


@pytest.mark.parametrize("variant", ["cpu", "gpu", "paper"])
@pytest.mark.parametrize("record", [r for r in RECORDS if r is not settings.ModelSettings])
def test_from_config_reads_the_values_default_sets(record, variant):
  config = default.get_config(variant)
  got = record.from_config(config)
  for name, value in _flat(got).items():
    path = _CONFIG_NAME.get(name, f"{_SECTION[record]}.{name}")
    want = settings.read(config, path)
    if record is settings.SamplingSettings and name == "steps" and config.sampling.sampler == "ddpm":
      want = config.diffusion.num_steps  # DDPM always takes the T training steps
    assert value == want, (path, value, want)


def test_model_settings_group_the_three_records():
  config = default.get_config()
  model = settings.ModelSettings.from_config(config)
  assert model.diffusion == settings.DiffusionSettings.from_config(config)
  assert model.prior == settings.PriorSettings.from_config(config)
  assert model.loss == settings.LossSettings.from_config(config)


def test_a_field_whose_absence_changed_nothing_comes_from_todays_defaults():
  """A version-1 config saved before `train.tensorboard` existed (the nytaxi comparison's
  DiffRecon was) loads: fields outside MIGRATIONS are filled from configs/default.py."""
  config = default.get_config()
  del config["config_version"]
  del config.train["tensorboard"]
  del config.train["log_every"]
  migrated = settings.migrate(config)
  assert migrated.train.tensorboard is False
  assert migrated.train.log_every == default.get_config().train.log_every
  settings.TrainSettings.from_config(migrated)  # reads every train field
  today = default.get_config()  # a current config that lacks a field is not filled
  del today.train["tensorboard"]
  with pytest.raises(settings.MissingField, match="train.tensorboard"):
    settings.TrainSettings.from_config(settings.migrate(today))


def test_a_version_3_config_trains_on_the_one_table():
  saved = json.loads(GOLDEN_CONFIG_V3.read_text())
  assert saved["config_version"] == 3 and "prior_cross_fit_folds" not in saved["diffusion"]
  migrated = checkpoints.config_from_json(GOLDEN_CONFIG_V3.read_text())
  assert settings.PriorSettings.from_config(migrated).cross_fit_folds == 0
