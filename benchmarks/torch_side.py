"""The PyTorch side of each measurement: drives the eager twins of `benchmarks/torch_twin.py`.

Importable without PyTorch (torch and the twin are imported when a `TorchSide` is built), so the
JAX-only suite (`--no-torch`) runs on a machine without the `bench` extra.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.cases import Case, count_params
from benchmarks.timing import timed_reps
from diffrecon_jax.diffrecon import model


class TorchSide:
  """Twins of one case's two denoisers, loaded with the same parameters, on cpu or cuda.

  Raises RuntimeError when a twin's parameter count differs from the flax model's, and
  ValueError (from `torch_twin.load_flax_params`) on a missing or mis-shaped leaf.
  """

  def __init__(self, case: Case, models: model.Models, params: Any, device: str):
    import torch
    from benchmarks import torch_twin as tt
    self.torch, self.tt, self.device = torch, tt, device
    s = case.shapes
    kw = dict(t=case.window, grid=tuple(s["coarse_shape"]), channels=int(s["channels"]),
              external_dim=int(s["external_dim"]))
    self.c = tt.DiffusionCNet(**kw, **case.config.model_c.to_dict())
    self.f = tt.DiffusionFNet(**kw, scale=int(s["scale"]), **case.config.model_f.to_dict())
    self.counts = {"c": (count_params(params["c"]), tt.count_params(self.c)),
                   "f": (count_params(params["f"]), tt.count_params(self.f))}
    for name, (nj, nt) in self.counts.items():
      if nj != nt:
        raise RuntimeError(f"parameter count mismatch for Diffusion-{name.upper()}: flax {nj}, "
                           f"torch twin {nt}; the twin no longer mirrors the flax module")
    tt.load_flax_params(self.c, jax.device_get(params["c"]))
    tt.load_flax_params(self.f, jax.device_get(params["f"]))
    self.c.to(device)
    self.f.to(device)
    self.schedule = tt.Schedule(models.schedule, device)

  def tensors(self, batch: dict) -> dict:
    return {k: self.torch.as_tensor(np.asarray(v), device=self.device) for k, v in batch.items()}

  def sync(self):
    if self.device != "cpu":
      self.torch.cuda.synchronize()

  def check_outputs(self, models: model.Models, params: Any, batch: dict) -> dict:
    """Max |flax - torch| of both denoisers on the batch (tau spread over [0, T)).

    Returns max_abs_diff_c, max_abs_diff_f and max_abs_out (the larger flax output, for a
    relative tolerance).
    """
    b = batch["obs"].shape[0]
    tau = (np.arange(b) * models.schedule.num_steps // max(b, 1)).astype(np.int32)
    cond_c = {k: batch[k] for k in ("obs", "mask", "external")}
    cond_f = {"coarse": batch["coarse"], "external": batch["external"]}
    x_c, x_f = batch["coarse"][:, -1], batch["fine"]
    jc = np.asarray(models.c.apply({"params": params["c"]}, x_c, jnp.asarray(tau), cond_c))
    jf = np.asarray(models.f.apply({"params": params["f"]}, x_f, jnp.asarray(tau), cond_f))
    tb = self.tensors({"x_c": x_c, "x_f": x_f, "tau": tau.astype(np.int64), **batch})
    with self.torch.no_grad():
      pc = self.c(tb["x_c"], tb["tau"], {k: tb[k] for k in cond_c}).cpu().numpy()
      pf = self.f(tb["x_f"], tb["tau"], {k: tb[k] for k in cond_f}).cpu().numpy()
    return {"max_abs_diff_c": float(np.max(np.abs(pc - jc))),
            "max_abs_diff_f": float(np.max(np.abs(pf - jf))),
            "max_abs_out": float(max(np.max(np.abs(jc)), np.max(np.abs(jf))))}

  def train_bench(self, case: Case, batch: dict, phase: str, reps: dict,
                  x0_clip: Optional[float] = None) -> dict:
    """Eager train step of `phase` on the batch (x0_clip: the joint objective's bound, as
    `diffrecon.JointSettings.x0_clip`). Returns step_ms, reps, samples_per_s (and the CUDA
    peak)."""
    run = self.train_runner(case, batch, phase, x0_clip)
    return self.with_timing(case, timed_reps(run, **reps))

  def train_runner(self, case: Case, batch: dict, phase: str,
                   x0_clip: Optional[float] = None):
    """`run()`: one blocking train step of `phase` on the batch (for `timing.timed_reps`).
    On CUDA the peak-memory counter restarts here, so `with_timing` reports this step's peak,
    not an earlier case's."""
    tb = self.tensors(batch)
    step = self.tt.TrainStep(phase, self.c, self.f, self.schedule, case.config.train,
                             x0_clip=x0_clip)
    if self.device != "cpu":
      self.torch.cuda.reset_peak_memory_stats()

    def run():
      step(tb)
      self.sync()

    return run

  def with_timing(self, case: Case, r: dict) -> dict:
    """step_ms, reps, samples_per_s (and the CUDA peak) of one `timed_reps` result `r`."""
    out = {"step_ms": 1e3 * r["median_s"], "reps": r["reps"],
           "samples_per_s": case.batch_size / r["median_s"]}
    if self.device != "cpu":
      out["device_peak_bytes"] = int(self.torch.cuda.max_memory_allocated())
    return out

  def sampling_bench(self, case: Case, batch: dict, settings: model.SamplingSettings,
                     reps: dict) -> dict:
    """Diffusion-C completion + Diffusion-F inference with the twins' reverse chain (same
    sampler, steps, eta and samples as `settings`). Returns time_s, reps, fine_maps_per_s."""
    tb = self.tensors(batch)
    tt, s = self.tt, self.schedule
    c = int(case.shapes["channels"])
    n = int(case.shapes["scale"])
    kw = dict(n_samples=settings.n_samples, method=settings.sampler, num_steps=settings.steps,
              eta=settings.eta)

    def run():
      done = tt.sample_many(self.c, {k: tb[k] for k in ("obs", "mask", "external")}, s,
                            tuple(tb["obs"][:, -1].shape), known=tb["obs"][:, -1],
                            known_mask=tb["mask"][:, -1, ..., None], **kw)
      win = self.torch.cat([tb["coarse"][:, :-1], done[:, None]], dim=1)
      b, _, i, j, _ = win.shape
      tt.sample_many(self.f, {"coarse": win, "external": tb["external"]}, s,
                     (b, n * i, n * j, c), **kw)
      self.sync()

    r = timed_reps(run, **reps)
    maps = batch["obs"].shape[0] * settings.n_samples
    return {"time_s": r["median_s"], "reps": r["reps"], "fine_maps_per_s": maps / r["median_s"]}

  def component_bench(self, path: tuple, inputs: tuple, reps: dict) -> dict:
    """Forward and forward + backward of the twin sub-network at path ('c'|'f', name), eager.

    inputs: the flax sub-network's inputs (`cases.component_inputs`). Returns torch_fwd_ms,
    torch_fwd_bwd_ms.
    """
    torch = self.torch
    which, attr = path
    mod = getattr(getattr(self, which), attr)
    targs = [torch.as_tensor(np.asarray(a), device=self.device) for a in inputs]
    if attr == "UNet_0":
      targs[1] = targs[1].long()  # tau

    def fwd():
      with torch.no_grad():
        mod(*targs)
      self.sync()

    def fwd_bwd():
      mod.zero_grad(set_to_none=True)
      torch.mean(torch.square(mod(*targs))).backward()
      self.sync()

    return {"torch_fwd_ms": 1e3 * timed_reps(fwd, **reps)["median_s"],
            "torch_fwd_bwd_ms": 1e3 * timed_reps(fwd_bwd, **reps)["median_s"]}
