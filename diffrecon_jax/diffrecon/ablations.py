"""The paper's ablations (Sec. V-C) as one config switch, `config.ablation`.

Each ablation is the DiffRecon config with a few fields changed (`apply`), trained and scored like
DiffRecon itself; nothing is a copy of the model code:
  - ``noPre``: no separate pre-training; both stages are trained end to end from their
    initialisation (steps_c = steps_f = 0). The joint phase gets steps_c + steps_joint steps at
    the pre-training rates, so each denoiser sees as many updates as in DiffRecon (ours: the
    paper gives no budget for it).
  - ``noJoint``: the stages are trained apart and chained at test time (steps_joint = 0).
  - ``noSTPointFormer``: Diffusion-C without ST-PointFormer (model_c.use_inter = False).
  - ``noTPatternNet``: Diffusion-F without T-PatternNet (model_f.use_inter = False).
  - ``noFG``: Diffusion-F replaced by a deterministic super-resolution network
    (`config.ablation_fine_network`: srcnn, urbanfm, ... any of `supervised.NETWORKS`), trained
    on the complete coarse maps of the train split and applied to Diffusion-C's completion
    (`DiffCThenFine`). Only Diffusion-C is trained (steps_f = steps_joint = 0); the paper calls
    these DiffC-SRCNN, DiffC-UrbanFM, DiffC-FODE and DiffC-STCF. The composed method lives
    above the model and the baselines (`nofg.py`): this package imports no baseline.
`apply` changes fields to values computed from the *given* config, so it is called once on the
user's config per run (`run.run`); the checkpoint keeps the applied config, which evaluation reads.
"""
from __future__ import annotations

import ml_collections

from diffrecon_jax.diffrecon import settings

ABLATIONS = ("noPre", "noJoint", "noSTPointFormer", "noTPatternNet", "noFG")


def check(config: ml_collections.ConfigDict) -> str:
  """The config's ablation ("" = none); a ValueError names a bad one."""
  name = str(settings.read(config, "ablation"))
  if name and name not in ABLATIONS:
    raise ValueError(f"unknown ablation {name!r}; expected '' or one of {ABLATIONS}")
  if name and config.method != "diffrecon":
    raise ValueError(f"ablation {name!r} is an ablation of DiffRecon; it needs "
                     f"method='diffrecon', got {config.method!r}")
  return name


def method_name(config: ml_collections.ConfigDict) -> str:
  """The name the results carry: "diffrecon", "diffrecon-noPre", ..., "diffc-srcnn" (noFG)."""
  name = check(config)
  if not name:
    return "diffrecon"
  if name == "noFG":
    return f"diffc-{config.ablation_fine_network}"
  return f"diffrecon-{name}"


def apply(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with its ablation's fields changed (module docstring); the config
  itself when it has none."""
  name = check(config)
  if not name:
    return config
  c = config.copy_and_resolve_references()
  t = c.train
  if name == "noPre":
    t.steps_joint = int(t.steps_c) + int(t.steps_joint)
    t.steps_c = t.steps_f = 0
    t.lr_joint_c, t.lr_joint_f = float(t.lr_c), float(t.lr_f)
  elif name == "noJoint":
    t.steps_joint = 0
  elif name == "noSTPointFormer":
    c.model_c.use_inter = False
  elif name == "noTPatternNet":
    c.model_f.use_inter = False
  elif name == "noFG":
    t.steps_f = t.steps_joint = 0
  return c


# Phases an ablation trains exactly as DiffRecon does (same config where it matters, same seed,
# same keys): their finished checkpoints can be taken from DiffRecon's workdir instead of
# being trained again (`experiments.py`). Phase keys and batches depend on the seed and the
# phase alone (train.py), so a copied phase equals one trained here.
SHARED_PHASES = {"noJoint": ("stage_c", "stage_f"), "noFG": ("stage_c",)}

