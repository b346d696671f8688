"""The noFG ablation (paper Sec. V-C, Fig. 9) as a method: Diffusion-C's completion followed by a
deterministic super-resolution network of the baselines (DiffC-SRCNN, DiffC-UrbanFM, ...).

With `ablation_fine_on_base` (ours, the default) the network gets the base Diffusion-F gets: it
learns a correction of the prior's split of the completed coarse map (`prior_split`,
`supervised.OnBase`), so the ablation removes the fine diffusion model and nothing else.

It joins the model (diffrecon/) and the baselines (baselines/supervised.py), so it lives above
both: neither package imports the other.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import ml_collections
import numpy as np

from diffrecon_jax.baselines import supervised
from diffrecon_jax.diffrecon import ablations


def check_ablation(config: ml_collections.ConfigDict) -> str:
  """`ablations.check` (the config's ablation, "" = none), and for noFG a ValueError naming a
  fine network that is not a supervised one."""
  name = ablations.check(config)
  if name != "noFG":
    return name
  net = str(config.ablation_fine_network)
  if net not in supervised.NETWORKS:
    raise ValueError(f"ablation noFG: ablation_fine_network must be one of "
                     f"{supervised.NETWORKS}, got {net!r}")
  return name


class DiffCThenFine:
  """noFG: Diffusion-C completes the coarse maps, a supervised network infers the fine ones.

  Args:
    diffc: a `DiffReconMethod` (only its stage 1 is used).
    fine: a `supervised.SupervisedBaseline` trained on complete coarse maps (its
      `fine_from_coarse`).
    name: the name in the results ("diffc-srcnn", ...).
  """

  sampler = None  # the fine maps are deterministic given the completion

  def __init__(self, diffc, fine, name: str, on_base: bool = False):
    """on_base: the fine network corrects Diffusion-F's base (`prior_split`) instead of
    inferring the fine map alone; set before the network is trained (a no-op for a model
    without a fine base, e.g. the paper's)."""
    self.diffc, self.fine, self.name = diffc, fine, name
    if on_base:
      fine.base = prior_split(diffc)
    stage_2 = fine.name + (" on the prior's split" if fine.base is not None else "")
    self.sampler = {"stage_1": diffc.sampler, "stage_2": stage_2}

  def reconstruct(self, view, slices: np.ndarray) -> dict:
    """slices (n,) -> dict(coarse (n, I, J, C) Diffusion-C's completion, fine (n, NI, NJ, C),
    samples None), physical units."""
    coarse = self.diffc.complete(view, slices)
    return {"coarse": coarse, "fine": self.fine.fine_from_coarse(view, coarse, slices),
            "samples": None}


def prior_split(diffc) -> Optional[Callable]:
  """Diffusion-F's base of a `DiffReconMethod` (`Models.fine_base`: the prior's split of a
  coarse map at each slice's climatology slot, or the even split) as a
  `SupervisedBaseline.base`: (view, coarse (n, I, J, C) physical, slices (n,)) -> (n, N*I, N*J, C)
  physical fine maps pooling to `coarse` (NaN where `coarse` is NaN). None when the model has no
  fine base."""
  fine_base = diffc.models.fine_base
  if fine_base is None:
    return None
  split = jax.jit(fine_base)

  def base(view, coarse: np.ndarray, slices: np.ndarray) -> np.ndarray:
    slots = diffc.slots(view)[np.asarray(slices, np.int64)]
    x = view.coarse_norm.apply(np.asarray(coarse, np.float32))
    return view.fine_norm.inverse(np.asarray(split(x, slots))).astype(np.float32)

  return base


def fine_network(config: ml_collections.ConfigDict):
  """The noFG fine network: `config.ablation_fine_network` built from `config.baselines`, trained
  on the complete coarse maps only (what these networks were made for)."""
  c = config.copy_and_resolve_references()
  c.baselines.train_masked = False
  return supervised.build(str(config.ablation_fine_network), c)
