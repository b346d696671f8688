"""The noFG ablation (paper Sec. V-C, Fig. 9) as a method: Diffusion-C's completion followed by a
deterministic super-resolution network of the baselines (DiffC-SRCNN, DiffC-UrbanFM, ...).

It joins the model (diffrecon/) and the baselines (baselines/supervised.py), so it lives above
both: neither package imports the other.
"""
from __future__ import annotations

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

  def __init__(self, diffc, fine, name: str):
    self.diffc, self.fine, self.name = diffc, fine, name
    self.sampler = {"stage_1": diffc.sampler, "stage_2": fine.name}

  def reconstruct(self, view, slices: np.ndarray) -> dict:
    """slices (n,) -> dict(coarse (n, I, J, C) Diffusion-C's completion, fine (n, NI, NJ, C),
    samples None), physical units."""
    coarse = self.diffc.complete(view, slices)
    return {"coarse": coarse, "fine": self.fine.fine_from_coarse(view, coarse, slices),
            "samples": None}


def fine_network(config: ml_collections.ConfigDict):
  """The noFG fine network: `config.ablation_fine_network` built from `config.baselines`, trained
  on the complete coarse maps only (what these networks were made for)."""
  c = config.copy_and_resolve_references()
  c.baselines.train_masked = False
  return supervised.build(str(config.ablation_fine_network), c)
