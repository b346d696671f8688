"""Timing helpers of the benchmarks: repeated timed calls, XLA cost and memory analyses, the
machine description and the load average written into results.json. No model code here.
"""
from __future__ import annotations

import os
import pathlib
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
  info["peak_flops"], info["peak_flops_source"] = peak_flops(device)
  return info


# Published dense peaks (FLOP/s) per accelerator kind, (float32, bfloat16): NVIDIA data sheets
# (SXM parts, no sparsity) and Google Cloud's TPU pages. A kind not listed gets no MFU.
ACCELERATOR_PEAKS = {
    "H200": (67e12, 989e12), "H100": (67e12, 989e12), "A100": (19.5e12, 312e12),
    "L4": (30.3e12, 121e12), "TPU v4": (None, 275e12), "TPU v5 lite": (None, 197e12),
    "TPU v5e": (None, 197e12), "TPU v5p": (None, 459e12), "TPU v6 lite": (None, 918e12)}


def cpu_peak_flops(cpuinfo: str, cores: int, max_khz: Optional[int] = None) -> Optional[float]:
  """float32 peak of a CPU: cores x SIMD lanes (16 with AVX-512, 8 with AVX2, 4 with SSE / NEON)
  x 2 (fused multiply-add) x 2 FMA units x clock (cpufreq's maximum, else /proc/cpuinfo's
  current MHz). An upper bound: the FMA units per core vary by model."""
  flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                if line.startswith(("flags", "Features"))), [])
  lanes = 16 if "avx512f" in flags else 8 if ("avx2" in flags and "fma" in flags) else 4
  hz = max_khz * 1e3 if max_khz else None
  if hz is None:
    mhz = [float(line.split(":", 1)[1]) for line in cpuinfo.splitlines()
           if line.startswith("cpu MHz")]
    hz = max(mhz) * 1e6 if mhz else None
  return cores * lanes * 2 * 2 * hz if hz else None


def peak_flops(device: str) -> tuple:
  """(peak FLOP/s or None, how it was obtained) of this machine's first device in float32 (the
  precision the suite runs in)."""
  if device == "cpu":
    try:
      text = pathlib.Path("/proc/cpuinfo").read_text()
    except OSError:
      return None, "no /proc/cpuinfo"
    khz = None
    try:
      khz = int(pathlib.Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
                .read_text())
    except (OSError, ValueError):
      pass
    return (cpu_peak_flops(text, os.cpu_count() or 1, khz),
            "cores x SIMD lanes x 2 (FMA) x 2 units x clock")
  kind = str(getattr(jax.devices()[0], "device_kind", ""))
  for name, (fp32, _) in ACCELERATOR_PEAKS.items():
    if name.lower() in kind.lower() and fp32:
      return fp32, f"published float32 dense peak of {name}"
  return None, f"no published peak for {kind!r}"


def mfu(achieved_flops_per_s: Optional[float], peak: Optional[float]) -> Optional[float]:
  """Achieved over peak FLOP/s (model FLOPs utilisation), or None when either is unknown."""
  return achieved_flops_per_s / peak if achieved_flops_per_s and peak else None


def load_average() -> Optional[list]:
  """The 1, 5 and 15 minute load averages (other jobs on the cores skew every timing)."""
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None
