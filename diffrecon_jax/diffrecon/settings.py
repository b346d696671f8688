"""DiffRecon's settings as typed, frozen records, read once from the config; `migrate` for
configs saved by earlier versions.

One value, one home: every default lives in configs/default.py (with where it comes from).
The records below have no defaults; `from_config` reads each field as a plain attribute, checks
the choices and names a missing field ("config has no diffusion.coarse_residual: ..."), so
deleting a field from the config is an error, never a silent switch to other behaviour.

The config's layout is kept (command-line flags and saved configs name its fields); the records
group the fields by what they decide:
  ModelSettings     what the model is (built by `model.build_models`): its noise process
                    (`DiffusionSettings`, config.diffusion), the first guesses its targets are
                    taken over (`PriorSettings`, config.diffusion) and its training objective
                    (`LossSettings`: config.train.loss_c_on_hidden / point_fraction /
                    point_loss, model switches that live in the train section);
  TrainSettings     how it is trained (config.train; built by `train.train`);
  SamplingSettings  how it is sampled (config.sampling; built by `DiffReconMethod`);
  CalibrationSettings  the recalibration of its ensemble (config.calibration, eval.max_slices).

A saved config (checkpoint metadata, config.json) is read back through `migrate`, which adds
each field its version lacked with the value that reproduces the behaviour it was saved with
(`MIGRATIONS`); `config_version` says which version a config is (none = 1).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from diffrecon_jax.configs import default

# The version configs/default.py writes (its `config_version` field).
CONFIG_VERSION = 4

# Chosen at evaluate time: a trained model's evaluation takes these from the command's config,
# replacing the checkpoint's saved values whole (`loading.from_workdir`; the noFG ablation's
# fine network is trained when evaluated, like the supervised baselines), and a resumed
# training does not count them as a change of config (`checkpoints.same_config`).
EVALUATE_TIME_FIELDS = ("eval", "patterns", "sampling", "calibration", "baselines",
                        "ablation_fine_network", "ablation_fine_on_base", "climatology")

# Fields a config of an earlier version may lack: (version that introduced the field, dotted
# path, value that reproduces the earlier behaviour). The values are those the code read when
# the field was absent, before version 2 made every field required.
MIGRATIONS = (
    (4, "diffusion.prior_cross_fit_folds", 0),    # one table, its own targets in training
    (3, "train.ema_warmup", False),               # the EMA decayed at ema_decay from step 1
    (3, "train.lr_schedule", "constant"),         # one rate per phase
    (3, "calibration.val_stride", 1),             # fitted on every validation slice
    (2, "ablation", ""),                          # no ablation: DiffRecon itself
    (2, "diffusion.fine_residual", False),        # Diffusion-F diffused the fine map itself
    (2, "diffusion.fine_base", "uniform"),        # residual base: the even spread
    (2, "diffusion.coarse_residual", False),      # Diffusion-C diffused the coarse map itself
    (2, "diffusion.residual_scaling", ""),        # residuals not rescaled
    (2, "diffusion.prediction", "eps"),           # DDPM's noise prediction (the paper)
    (2, "diffusion.guess_local_level", False),    # first guess at the map's one level
    (2, "diffusion.guess_local_sigma", 0.0),
    (2, "diffusion.guess_local_shrink", 1.0),
    (2, "diffusion.prior_slot_sigma_minutes", 0.0),  # the raw slot means
    (2, "model_c.location_dim", 0),               # no location embedding (the module's value)
    (2, "model_c.attention_impl", None),          # attention chosen by backend
    (2, "model_f.location_dim", 0),
    (2, "sampling.point", "median"),              # the median of the samples
    (2, "sampling.ensemble", "shared_completion"),  # one completion shared by every sample
    (2, "sampling.prng_impl", ""),                # JAX's default PRNG
    (2, "train.loss_c_on_hidden", False),         # Diffusion-C's loss on every cell
    (2, "train.point_fraction", 0.0),             # tau drawn uniformly
    (2, "train.point_loss", "l2"),
    (2, "train.adam_eps", 1e-8),                  # optax's
    (2, "train.joint_x0_clip_factor", 0.0),       # no clip in the joint loss
    (2, "train.init_prng_impl", "rbg"),
    (2, "train.compilation_cache_dir", ""),       # no persistent compilation cache
    (2, "eval.max_slices", 0),                    # the whole split
    (2, "eval.chunk_slices", 0),
    (2, "eval.concurrent_batches", 0),            # by backend
    (2, "data.tfds_dir", ""),                     # read the source files
    (2, "data.gap_rule", "skip"),
    (2, "climatology.table", "auto"),             # chosen on the validation split
    (2, "calibration.enabled", False),            # no recalibration
    (2, "calibration.spread_rule", "spread_skill"),
    (2, "calibration.val_slices", 0),
)


class MissingField(ValueError):
  """A config lacks a field the code reads (a ValueError: main.py reports it in one line)."""


def read(config: ml_collections.ConfigDict, path: str) -> Any:
  """config's field at the dotted `path`; MissingField names it when absent."""
  node = config
  for part in path.split("."):
    if not isinstance(node, (ml_collections.ConfigDict, dict)) or part not in node:
      raise MissingField(
          f"config has no {path}: configs/default.py sets every field (start from "
          "default.base_config()); a config saved by an earlier version is read through "
          "settings.migrate")
    node = node[part]
  return node


def choice(config: ml_collections.ConfigDict, path: str, allowed: tuple) -> str:
  """`read(config, path)` after checking it is one of `allowed`."""
  value = read(config, path)
  if value not in allowed:
    raise ValueError(f"{path} must be one of {allowed}, got {value!r}")
  return value


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
PREDICTIONS = ("eps", "x0")
FINE_BASES = ("uniform", "climatology")
RESIDUAL_SCALINGS = ("", "channel", "cell")
POINT_LOSSES = ("l2", "l1", "l1_physical")


@dataclasses.dataclass(frozen=True)
class DiffusionSettings:
  """The noise process shared by both stages (Sec. IV-B, eq. 4) and what the denoisers output.

  num_steps: T; schedule, beta_start, beta_end: the beta schedule (`diffusion.make_schedule`).
  prediction: "eps" (the noise, DDPM; the paper) or "x0" (the clean target; ours).
  """
  num_steps: int
  schedule: str
  beta_start: float
  beta_end: float
  prediction: str

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "DiffusionSettings":
    return cls(num_steps=int(read(config, "diffusion.num_steps")),
               schedule=str(read(config, "diffusion.schedule")),
               beta_start=float(read(config, "diffusion.beta_start")),
               beta_end=float(read(config, "diffusion.beta_end")),
               prediction=choice(config, "diffusion.prediction", PREDICTIONS))


@dataclasses.dataclass(frozen=True)
class PriorSettings:
  """The first guesses the two stages' targets are taken over (ours; `prior.py`).

  coarse_residual: Diffusion-C diffuses coarse - the climatological first guess.
  fine_residual: Diffusion-F diffuses fine - `fine_base` of the coarse map.
  fine_base: "uniform" (each coarse value spread evenly) or "climatology" (split by the
    prior's per-slot shares).
  residual_scaling: residuals divided by their train-split std per "channel" or per "cell"
    (and channel), or "" = not.
  guess_local_level, guess_local_sigma, guess_local_shrink: a hidden cell's first guess at
    the level of its own earlier observations (`prior.local_level`).
  slot_sigma_minutes: the slot means smoothed over neighbouring slots (`prior.smooth_over_slots`).
  cross_fit_folds: K > 1 = training reads each training slice's guess and base from the table
    fitted without its day's fold (`prior.fit_prior`); 0 = the one table.
  """
  coarse_residual: bool
  fine_residual: bool
  fine_base: str
  residual_scaling: str
  guess_local_level: bool
  guess_local_sigma: float
  guess_local_shrink: float
  slot_sigma_minutes: float
  cross_fit_folds: int

  @property
  def uses_prior(self) -> bool:
    """Whether a stage needs the fitted climatology (`prior.fit_prior`)."""
    return self.coarse_residual or (self.fine_residual and self.fine_base == "climatology")

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "PriorSettings":
    d = "diffusion."
    return cls(coarse_residual=bool(read(config, d + "coarse_residual")),
               fine_residual=bool(read(config, d + "fine_residual")),
               fine_base=choice(config, d + "fine_base", FINE_BASES),
               residual_scaling=choice(config, d + "residual_scaling", RESIDUAL_SCALINGS),
               guess_local_level=bool(read(config, d + "guess_local_level")),
               guess_local_sigma=float(read(config, d + "guess_local_sigma")),
               guess_local_shrink=float(read(config, d + "guess_local_shrink")),
               slot_sigma_minutes=float(read(config, d + "prior_slot_sigma_minutes")),
               cross_fit_folds=int(read(config, d + "prior_cross_fit_folds")))


@dataclasses.dataclass(frozen=True)
class LossSettings:
  """The training objective's model switches (config.train; `model.stage_loss`, `diffuse`).

  loss_c_on_hidden: Diffusion-C's loss on the hidden cells of the current slice only.
  point_fraction: share of each batch drawn at tau = T - 1, where an x0-predictor learns its
    point estimate.
  point_loss: that step's loss, "l2" (posterior mean), "l1" (posterior median, absolute error
    of the stage's scaled residual) or "l1_physical" (the same median, the absolute error
    weighted by each cell's residual scale times the channel's std: the error in the data's
    units, as the MAE counts it; `model.Models.point_scale`).
  """
  loss_c_on_hidden: bool
  point_fraction: float
  point_loss: str

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "LossSettings":
    return cls(loss_c_on_hidden=bool(read(config, "train.loss_c_on_hidden")),
               point_fraction=float(read(config, "train.point_fraction")),
               point_loss=choice(config, "train.point_loss", POINT_LOSSES))


@dataclasses.dataclass(frozen=True)
class ModelSettings:
  """Everything but the networks' sizes (config.model_c / model_f, the modules' own fields)
  that decides what the model is; read once by `model.build_models`."""
  diffusion: DiffusionSettings
  prior: PriorSettings
  loss: LossSettings

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "ModelSettings":
    return cls(diffusion=DiffusionSettings.from_config(config),
               prior=PriorSettings.from_config(config), loss=LossSettings.from_config(config))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
LR_SCHEDULES = ("constant", "cosine")  # train.learning_rate

@dataclasses.dataclass(frozen=True)
class TrainSettings:
  """The loop, its optimizers and checkpoints (Sec. IV-E; config.train, same field names).

  steps_c / steps_f / steps_joint: steps of each phase; lr_*: AdamW rates per phase and model;
  weight_decay, adam_eps, grad_clip (global norm; 0 = none); joint_weight_c / _f: w_c, w_f of
  the joint loss; joint_x0_clip_factor: `model.x0_clip_bound` factor in the joint loss (0 =
  none); ema_decay, ema_warmup: the EMA's decay and whether it warms up from the phase's first
  step (`train.ema_decay_at`); lr_schedule: "constant" or "cosine" (`train.learning_rate`);
  compile_ahead: compile the later phases' steps while the first trains (`train._CompileAhead`);
  steps_per_call: steps fused per compiled call; log_every,
  checkpoint_every, keep_checkpoints: cadences in steps and Orbax's max_to_keep; tensorboard:
  also write TensorBoard events; init_prng_impl: PRNG of the parameter initialisers.
  """
  batch_size: int
  steps_c: int
  steps_f: int
  steps_joint: int
  lr_c: float
  lr_f: float
  lr_joint_c: float
  lr_joint_f: float
  weight_decay: float
  adam_eps: float
  grad_clip: float
  joint_weight_c: float
  joint_weight_f: float
  joint_x0_clip_factor: float
  ema_decay: float
  ema_warmup: bool
  lr_schedule: str
  compile_ahead: bool
  steps_per_call: int
  log_every: int
  checkpoint_every: int
  keep_checkpoints: int
  tensorboard: bool
  init_prng_impl: str

  def steps(self, phase: str) -> int:
    """Steps of `phase` ("stage_c", "stage_f" or "joint")."""
    return {"stage_c": self.steps_c, "stage_f": self.steps_f,
            "joint": self.steps_joint}[phase]

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "TrainSettings":
    values = {}
    for f in dataclasses.fields(cls):
      kind = {"int": int, "float": float, "bool": bool, "str": str}[f.type]
      values[f.name] = kind(read(config, "train." + f.name))
    choice(config, "train.lr_schedule", LR_SCHEDULES)  # a typo stops here, not phases later
    return cls(**values)


# --------------------------------------------------------------------------------------------
# Sampling and its recalibration
# --------------------------------------------------------------------------------------------
SAMPLERS = ("ddim", "ddpm")
POINTS = ("median", "posterior_mean")
ENSEMBLES = ("members", "shared_completion")


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """The sampler, from `config.sampling` (hashable: static under jit).

  sampler: "ddim" (S = `steps` steps) or "ddpm" (ancestral, all T training steps).
  steps: S for DDIM; T (diffusion.num_steps) for DDPM.
  eta: DDIM stochasticity (0 = deterministic chain, 1 = DDPM-like noise).
  n_samples: samples per input.
  consistent: fine maps pool exactly to the completed coarse map (needs the residual target).
  point: the point estimate: "median" (per-cell median of the samples; stage 1 completes with
    it) or "posterior_mean" (one pass of an x0-predicting denoiser on pure noise, its estimate
    of E[target | conditioning]: the MSE-optimal point without sampling noise; stage 1 then
    draws no samples at all, the fine samples serve the sample metrics only).
  ensemble: how the S ensemble members arise: "members" (each member draws its own completion
    of the hidden coarse cells with Diffusion-C, with one noise draw shared by every slice so a
    member's history window is coherent in time, and its own fine map from its own window:
    member m's fine map pools to member m's completion; `model.sample_coarse_members`,
    `sample_fine_members`) or "shared_completion" (one completed coarse map per slice, every
    fine sample pools to it: the spread of the hidden coarse cells never enters the samples).
  x0_clip_factor: each reverse step's s_0 estimate clipped by `model.x0_clip_bounds` of this
    factor (0 = no clip).
  prng_impl: the PRNG of the sampler's noise ("" = JAX's default).
  """
  sampler: str
  steps: int
  eta: float
  n_samples: int
  consistent: bool
  point: str
  ensemble: str
  x0_clip_factor: float
  prng_impl: str

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "SamplingSettings":
    sampler = choice(config, "sampling.sampler", SAMPLERS)
    steps = (int(read(config, "sampling.steps")) if sampler == "ddim"
             else int(read(config, "diffusion.num_steps")))
    ensemble = choice(config, "sampling.ensemble", ENSEMBLES)
    n_samples = int(read(config, "sampling.n_samples"))
    if ensemble == "members" and n_samples < 2:
      raise ValueError("sampling.ensemble='members' needs sampling.n_samples >= 2 (a spread)")
    return cls(sampler=sampler, steps=steps, eta=float(read(config, "sampling.eta")),
               n_samples=n_samples, consistent=bool(read(config, "sampling.consistent")),
               point=choice(config, "sampling.point", POINTS), ensemble=ensemble,
               x0_clip_factor=float(read(config, "sampling.x0_clip_factor")),
               prng_impl=str(read(config, "sampling.prng_impl")))

  def describe(self) -> dict:
    """The `sampler` entry of results.json."""
    d = {"name": self.sampler, "steps": self.steps, "n_samples": self.n_samples,
         "point": self.point, "ensemble": self.ensemble}
    if self.sampler == "ddim":
      d["eta"] = self.eta
    return d


SPREAD_RULES = ("spread_skill", "crps")


@dataclasses.dataclass(frozen=True)
class CalibrationSettings:
  """The ensemble's recalibration on the validation split (config.calibration; calibration.py).

  enabled: fit and apply it; spread_rule: "spread_skill" or "crps"; val_slices: validation
  slices fitted on (0 = all), capped by max_slices (eval.max_slices, smoke runs; 0 = none);
  val_stride: every val_stride-th block of them (`calibration.validation_slices`; 1 = all).
  """
  enabled: bool
  spread_rule: str
  val_slices: int
  val_stride: int
  max_slices: int

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "CalibrationSettings":
    stride = int(read(config, "calibration.val_stride"))
    if stride < 1:
      raise ValueError(f"calibration.val_stride must be >= 1 (1 = every validation slice), got "
                       f"{stride}")
    return cls(enabled=bool(read(config, "calibration.enabled")),
               spread_rule=choice(config, "calibration.spread_rule", SPREAD_RULES),
               val_slices=int(read(config, "calibration.val_slices")),
               val_stride=stride, max_slices=int(read(config, "eval.max_slices")))

  @property
  def fit_slices(self) -> int:
    """Validation slices to fit on (0 = all): a smoke run fits on as few as it scores."""
    if self.max_slices:
      return min(self.val_slices, self.max_slices) if self.val_slices else self.max_slices
    return self.val_slices


# --------------------------------------------------------------------------------------------
# Configs saved by earlier versions
# --------------------------------------------------------------------------------------------
def version(config: ml_collections.ConfigDict) -> int:
  """The config's `config_version`; 1 for a config saved before the field existed."""
  return int(config["config_version"]) if "config_version" in config else 1


def migrate(saved: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of a saved config upgraded to `CONFIG_VERSION`: each field of `MIGRATIONS` that
  its version lacked is added with the value that reproduces the behaviour it was saved with;
  the fields it has are kept as saved. A field of neither (one whose absence never changed
  what a run computes: `train.tensorboard`, log cadences, ...) comes from today's
  `configs/default.base_config()`. A current config comes back equal to itself."""
  have = version(saved)
  if have > CONFIG_VERSION:
    raise ValueError(f"the saved config is of version {have}, newer than this code's "
                     f"{CONFIG_VERSION}: update diffrecon_jax to read it")
  out = ml_collections.ConfigDict(saved.to_dict())
  for introduced, path, old in MIGRATIONS:
    if have < introduced:
      _set_missing(out, path, old)
  if have < CONFIG_VERSION:
    _fill_missing(out, default.base_config().to_dict())
  out.config_version = CONFIG_VERSION
  return out


def _fill_missing(config: ml_collections.ConfigDict, base: dict) -> None:
  """Adds every field of `base` (nested dicts) that `config` lacks, in place."""
  for key, value in base.items():
    if key not in config:
      config[key] = value
    elif isinstance(value, dict) and isinstance(config[key], ml_collections.ConfigDict):
      _fill_missing(config[key], value)


def _set_missing(config: ml_collections.ConfigDict, path: str, value: Any) -> None:
  *sections, key = path.split(".")
  node = config
  for name in sections:
    if name not in node:
      node[name] = ml_collections.ConfigDict()
    node = node[name]
  if key not in node:
    node[key] = value
