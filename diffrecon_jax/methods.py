"""What a method is (`Method`) and every method by name (`REGISTRY`): the one list of names that
the dispatcher (`run.py`), the comparison (`experiments.py`) and the ablations read.

A method is scored by `evaluate.evaluate_method` (docs/evaluation.md): it sees an
`evaluate.ObservedTask` (the coarse series with the hidden cells NaN, the mask, the external
features and the train split's truth) and returns its reconstruction of some slices. A method that
learns trains on the view's train split, in `fit` or inside its first `reconstruct`.

The registry maps each name to an `Entry`: its group (`GROUPS`) and, for the methods built from a
config alone (the references and the baselines), its builder. DiffRecon, its prior, the paper's
model and the ablations are trained by DiffRecon's loop and loaded from a workdir
(`run.run`, `run.load_method`); `method_config` gives the config each of them trains with.

This module sits above both `baselines/` and `diffrecon/` (neither imports the other).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Protocol, runtime_checkable

import ml_collections
import numpy as np

from diffrecon_jax import nofg
from diffrecon_jax.baselines import climatology, diffuflow, interp, supervised, urbansta
from diffrecon_jax.diffrecon import ablations


@runtime_checkable
class Method(Protocol):
  """The evaluation contract's method.

  Attributes:
    name: the method's name in the results ("diffrecon", "interp", ...).
    sampler: its sampler's settings as a JSON-able dict (steps, eta, n_samples, ...), or None for
      a deterministic method.
  """
  name: str
  sampler: Optional[dict]

  def reconstruct(self, view, slices: np.ndarray) -> dict:
    """view: `evaluate.ObservedTask`; slices (n,) indices of the current slices (each with the
    view's `history` slices before it) -> {"coarse": (n, I, J, C) completed coarse maps,
    "fine": (n, N*I, N*J, C) fine maps (the point estimate), "samples": (S, n, N*I, N*J, C) or
    None}, float32 physical units. Observed coarse cells are to be kept as observed."""


@runtime_checkable
class Trainable(Method, Protocol):
  """A method that learns from the view's train split (optional: `reconstruct` trains first when
  it has not): `fit(view)` trains once per distinct train split (`supervised.train_key`)."""

  def fit(self, view) -> None:
    """Trains on `view.train_coarse` -> `view.train_fine` (nothing else of the view)."""


@dataclasses.dataclass(frozen=True)
class Entry:
  """One registered method.

  Attributes:
    group: one of `GROUPS`.
    build: config -> `Method` for the methods built from a config alone; None for those trained
      by DiffRecon's loop and loaded from a workdir (`run.load_method`).
    label: words for the comparison's list of columns ("" = none).
  """
  group: str
  build: Optional[Callable[[ml_collections.ConfigDict], Method]] = None
  label: str = ""


MAIN = "diffrecon"
# DiffRecon's prior alone (diffrecon/prior_method.py), from the trained DiffRecon's prior.npz:
# the networks' contribution is the column difference.
PRIOR = "prior"
# The paper's model as published (configs/default.use_paper_architecture), trained and scored
# beside DiffRecon with the same steps, patterns and masks.
PAPER = "diffrecon_paper"
# noFG replaces Diffusion-F by these supervised networks (paper Fig. 9).
NOFG_NETWORKS = ("srcnn", "urbanfm", "fode", "stcf")
# Groups in the order the comparison runs and lists them (DiffRecon trains before the ablations
# that reuse its phases).
GROUPS = ("references", "baselines", "diffrecon", "ablations")


def _supervised(name: str) -> Callable:
  return lambda config: supervised.build(name, config)


def _registry() -> dict:
  """name -> Entry, in the comparison's column order."""
  reg = {"interp": Entry("references", lambda config: interp.InterpBaseline()),
         "climatology": Entry("references", lambda config: climatology.ClimatologyBaseline())}
  # The paper's seven baselines (Sec. V-A.4) in its column order.
  reg.update({name: Entry("baselines", _supervised(name)) for name in supervised.NETWORKS})
  reg["urbansta"] = Entry("baselines", urbansta.build)
  reg["diffuflow"] = Entry("baselines", diffuflow.build)
  reg[MAIN] = Entry("diffrecon", label="DiffRecon as built here (with the climatology prior)")
  reg[PRIOR] = Entry("diffrecon", label="DiffRecon's prior alone (no network)")
  reg[PAPER] = Entry("diffrecon", label="the paper's model as published (`:paper`: no prior, "
                     "eps prediction, DDPM over all T steps, median of the samples)")
  for a in ablations.ABLATIONS:
    names = ([f"diffc-{n}" for n in NOFG_NETWORKS] if a == "noFG" else [f"diffrecon-{a}"])
    reg.update({name: Entry("ablations") for name in names})
  return reg


REGISTRY = _registry()


def names(group: str = "") -> tuple:
  """Registered names in the registry's order; of one group (`GROUPS`) when given."""
  if group and group not in GROUPS:
    raise ValueError(f"unknown group {group!r}; expected one of {GROUPS}")
  return tuple(n for n, e in REGISTRY.items() if not group or e.group == group)


def buildable() -> tuple:
  """Names `build` makes from a config alone (the references and the baselines)."""
  return tuple(n for n, e in REGISTRY.items() if e.build is not None)


def build(name: str, config=None) -> Method:
  """The method `name` with its hyperparameters from `config` (the references need none).
  A ValueError names an unknown name or one trained by DiffRecon's loop."""
  entry = REGISTRY.get(name)
  if entry is None or entry.build is None:
    raise ValueError(f"unknown method {name!r}; expected {MAIN!r} or one of {list(buildable())}")
  if config is None and entry.group != "references":
    raise ValueError(f"method {name!r} needs the config (its hyperparameters)")
  return entry.build(config)


def ablation_name(name: str) -> str:
  """The config ablation of a registered name: "noPre" for "diffrecon-noPre", "noFG" for every
  "diffc-<net>", "" for the others."""
  if name.startswith("diffc-"):
    return "noFG"
  return name[len("diffrecon-"):] if name.startswith("diffrecon-") else ""


def trains_diffrecon(name: str) -> bool:
  """Whether `name` trains DiffRecon's networks (itself, the paper's model or an ablation)."""
  return name in (MAIN, PAPER) or REGISTRY[name].group == "ablations"


def method_config(config: ml_collections.ConfigDict, name: str) -> ml_collections.ConfigDict:
  """The config the method `name` runs with: `config` with its method (and ablation) fields."""
  if name not in REGISTRY:
    raise ValueError(f"unknown method {name!r}; expected one of {list(REGISTRY)}")
  c = config.copy_and_resolve_references()
  c.ablation = ""
  if name == PAPER:
    from diffrecon_jax.configs import default as default_config  # the variant's one definition
    default_config.use_paper_architecture(c)
    c.method = MAIN
    # Its DDPM chains cost ~12x DiffRecon's DDIM: its calibration is fitted on a quarter of the
    # validation slices (ours: CPU budget; the point estimate does not depend on it).
    if not int(c.calibration.val_slices):
      c.calibration.val_slices = 270
  elif REGISTRY[name].group == "ablations":
    c.method, c.ablation = MAIN, ablation_name(name)
    if c.ablation == "noFG":
      c.ablation_fine_network = name[len("diffc-"):]
  else:
    c.method = name
  nofg.check_ablation(c)
  return c
