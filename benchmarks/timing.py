"""Timing helpers of the benchmarks: repeated timed calls, XLA cost and memory analyses, the
machine description and the load average written into results.json. No model code here.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Optional

import jax


def log(msg: str) -> None:
  print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def timed_reps(fn: Callable[[], Any], *, warmup: int, min_reps: int, max_reps: int,
               min_time: float) -> dict:
  """Runs fn (which must block until its work is done) warmup + repeated times.

  Repeats until min_reps runs and min_time seconds are reached, or max_reps runs.
  Returns {'median_s', 'min_s', 'max_s', 'reps'}.
  """
  for _ in range(warmup):
    fn()
  times, start = [], time.perf_counter()
  while len(times) < max_reps and (len(times) < min_reps or time.perf_counter() - start < min_time):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
          "reps": len(times)}


def ratio(t_torch: Optional[float], t_jax: Optional[float]) -> Optional[float]:
  """Speed-up of JAX over PyTorch (PyTorch time / JAX time), None when either is missing."""
  if not t_torch or not t_jax:
    return None
  return t_torch / t_jax


def cost_flops(compiled) -> Optional[float]:
  """FLOPs of a compiled XLA executable (cost_analysis is a dict, or a list of dicts)."""
  try:
    ca = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else {}
  f = (ca or {}).get("flops")
  return float(f) if f is not None and f >= 0 else None


def memory_bytes(compiled) -> Optional[dict]:
  """Compiled buffer sizes: arguments, outputs, temporaries, and their live total estimate."""
  try:
    m = compiled.memory_analysis()
  except Exception:
    return None
  if m is None:
    return None
  arg, out, tmp = m.argument_size_in_bytes, m.output_size_in_bytes, m.temp_size_in_bytes
  alias = m.alias_size_in_bytes
  return {"argument": int(arg), "output": int(out), "temp": int(tmp), "alias": int(alias),
          "total": int(arg + out + tmp - alias)}


def device_peak_bytes() -> Optional[int]:
  """Peak bytes in use on the first device (GPU; the CPU client reports none)."""
  stats = jax.devices()[0].memory_stats() or {}
  v = stats.get("peak_bytes_in_use")
  return int(v) if v is not None else None


def machine_info(device: str) -> dict:
  """The `machine` entry of results.json: versions, CPU model, core count, RAM (and GPU)."""
  info = {"python": sys.version.split()[0], "platform": platform.platform(),
          "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "jax_backend": jax.default_backend(), "jax_device": str(jax.devices()[0])}
  try:
    import flax
    info["flax"] = flax.__version__
  except ImportError:
    pass
  try:
    with open("/proc/cpuinfo") as f:
      names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    info["cpu_model"] = names[0] if names else platform.processor()
  except OSError:
    info["cpu_model"] = platform.processor()
  try:
    with open("/proc/meminfo") as f:
      info["ram_gb"] = round(int(f.readline().split()[1]) / 2 ** 20, 1)
  except (OSError, ValueError, IndexError):
    pass
  if device == "gpu":
    info["gpu"] = getattr(jax.devices()[0], "device_kind", "?")
  return info


def load_average() -> Optional[list]:
  """The 1, 5 and 15 minute load averages (other jobs on the cores skew every timing)."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None
