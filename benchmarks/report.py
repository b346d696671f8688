"""The report of a benchmark run: results.md (markdown tables) and scaling.png from results.json.

Reads nothing but the results dict, so a results.json re-renders anywhere (no JAX, no PyTorch;
matplotlib only for the plot):

  python -m benchmarks.report benchmarks/results/results.json            # markdown to stdout
  python -m benchmarks.report benchmarks/results/results.json --check    # == results.md beside it?
  python -m benchmarks.report benchmarks/results/results.json --out DIR  # DIR/results.md (+ plot)
"""
from __future__ import annotations

import argparse
import difflib
import json
import pathlib
import sys
from typing import Optional

import numpy as np


def _f(x, fmt="{:.1f}") -> str:
  return "-" if x is None else fmt.format(x)


def _table(title: str, columns: list, rows: list) -> list:
  """Markdown lines of a titled table; rows are lists of cell strings, one per column."""
  return ([f"## {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
          + ["| " + " | ".join(row) + " |" for row in rows] + [""])


def _header(results: dict) -> list:
  m = results["machine"]
  lines = [f"# diffrecon_jax benchmarks ({results['mode']}, device {results['device']})", "",
           f"Machine: {m.get('cpu_model')} ({m.get('cpu_count')} cores, {m.get('ram_gb')} GB)"
           + (f", GPU {m['gpu']}" if m.get("gpu") else "")
           + f"; jax {m['jax']} ({m['jax_backend']}), torch {m.get('torch', '-')}; load average "
           f"at start {results.get('load_start')}, at end {results.get('load_end')}.",
           f"Config: `{results['config']}`; speed-up = PyTorch time / JAX time (> 1: JAX faster).",
           ""]
  if m.get("peak_flops"):
    lines[-1:-1] = [f"MFU = achieved FLOP/s (XLA's cost analysis / time) over a float32 peak of "
                    f"{m['peak_flops'] / 1e9:.0f} GFLOP/s ({m.get('peak_flops_source')})."]
  chk = results.get("twin_check")
  if chk:
    lines += [f"Twin check: parameters Diffusion-C {chk['params_c']}, Diffusion-F "
              f"{chk['params_f']} (equal in both); max |flax - torch| of eps_hat: "
              f"{chk['max_abs_diff_c']:.1e} (C), {chk['max_abs_diff_f']:.1e} (F).", ""]
  return lines


def _row_notes(rows_in: list) -> list:
  """Lines for the distinct `torch_note`s of a table's rows (why the twin has no time there)."""
  notes = list(dict.fromkeys(r["torch_note"] for r in rows_in if r.get("torch_note")))
  return [f"PyTorch: {n}." for n in notes] + ([""] if notes else [])


def add_mfu(results: dict) -> dict:
  """Adds, in place, the model FLOPs utilisation beside every timed compiled call of `results`:
  "mfu" = achieved FLOP/s over the machine's peak (`timing.peak_flops`, in machine) where a row
  has "achieved_gflops" (train steps) or "flops" and "time_s" (samplers, which also get their
  "achieved_gflops"). Returns `results`."""
  peak = (results.get("machine") or {}).get("peak_flops")

  def visit(node):
    if isinstance(node, dict):
      if node.get("flops") and node.get("time_s") and "achieved_gflops" not in node:
        node["achieved_gflops"] = node["flops"] / node["time_s"] / 1e9
      if node.get("achieved_gflops") and peak:
        node["mfu"] = node["achieved_gflops"] * 1e9 / peak
      for value in node.values():
        visit(value)
    elif isinstance(node, list):
      for value in node:
        visit(value)

  visit(results)
  return results


def _train(rows_in: list, title: str = "Train step") -> list:
  rows = []
  for r in rows_in:
    j, t = r["jax"], r.get("torch", {})
    fused = r.get("jax_fused", {})
    mem = (j.get("memory") or {}).get("total")
    rows.append([
        r["phase"], str(r["batch"]), _f(j.get("step_ms")), _f(j.get("samples_per_s")),
        _f(fused.get("step_ms")) + (" (x%d)" % fused["steps_per_call"] if fused else ""),
        _f(j.get("compile_s")), _f((j.get("flops_per_step") or 0) / 1e9 or None, "{:.2f}"),
        _f(j.get("achieved_gflops")), _f(100 * j["mfu"] if j.get("mfu") else None, "{:.1f}"),
        _f(mem / 2**20 if mem else None, "{:.0f}"),
        _f(t.get("step_ms")), _f(t.get("samples_per_s")),
        _f(r.get("speedup_jax_over_torch"), "{:.2f}")])
  return _table(title, [
      "step", "batch", "JAX ms", "JAX samples/s", "JAX fused ms/step", "compile s",
      "GFLOP/step", "achieved GFLOP/s", "MFU %", "JAX mem MiB", "torch ms", "torch samples/s",
      "speed-up"], rows)


def _components(rows_in: list) -> list:
  rows = [[r["component"], str(r["params"]), _f(r["jax_fwd_ms"]), _f(r.get("torch_fwd_ms")),
           _f(r.get("speedup_fwd"), "{:.2f}"), _f(r["jax_fwd_bwd_ms"]),
           _f(r.get("torch_fwd_bwd_ms")), _f(r.get("speedup_fwd_bwd"), "{:.2f}"),
           _f(r["jax_compile_s"]), _f(r.get("jax_gflops_fwd_bwd"), "{:.2f}")]
          for r in rows_in]
  return _table("Where the time goes: sub-networks alone (forward / forward+backward)", [
      "sub-network", "params", "JAX fwd ms", "torch fwd ms", "fwd speed-up", "JAX fwd+bwd ms",
      "torch fwd+bwd ms", "fwd+bwd speed-up", "JAX compile s", "GFLOP fwd+bwd"], rows)


def _sampling(rows_in: list,
              title: str = "Sampling (Diffusion-C completion + Diffusion-F inference)") -> list:
  rows = []
  for r in rows_in:
    j, t = r["jax"], r.get("torch", {})
    rows.append([r["method"], str(r["steps"]), f"{r['windows']} x {r['n_samples']}",
                 _f(j["time_s"], "{:.2f}"), _f(j["fine_maps_per_s"]),
                 _f(j.get("achieved_gflops")), _f(100 * j["mfu"] if j.get("mfu") else None,
                                                  "{:.1f}"),
                 _f(j["compile_c_s"] + j["compile_f_s"]), _f(t.get("time_s"), "{:.2f}"),
                 _f(t.get("fine_maps_per_s")), _f(r.get("speedup_jax_over_torch"), "{:.2f}")])
  return _table(title, [
      "sampler", "steps", "windows x samples", "JAX s", "JAX fine maps/s", "achieved GFLOP/s",
      "MFU %", "compile C+F s",
      "torch s", "torch fine maps/s", "speed-up"], rows) + _row_notes(rows_in)


def _split(s: dict,
           title: str = "Whole test split, all evaluation patterns (real `reconstruct`)") -> list:
  return [f"## {title}", "",
          f"{s['slices']} slices x {s['patterns_total']} patterns, sampler {s['sampler']}, "
          f"eval batch {s['eval_batch']}: {s['all_patterns_s']:.0f} s"
          + (f" (extrapolated from {s['patterns_run']} pattern(s), measured "
             f"{s['measured_s']:.0f} s)" if s["extrapolated"] else " (measured)")
          + f"; {s['fine_maps_per_s']:.0f} fine maps/s. Target: < 120 s.", ""]


def _scaling(rows_in: list) -> list:
  rows = []
  for r in rows_in:
    j, t = r.get("jax", {}), r.get("torch", {})
    mem = (j.get("memory") or {}).get("total")
    note = j.get("skipped") or r.get("error")
    rows.append([str(r["axis"]), str(r["value"]), str(r["batch"]),
                 f"{r['coarse']} -> {r['fine']}", str(r["window"]), str(r["st_points"]),
                 _f(j.get("step_ms")) if not note else str(note), _f(j.get("compile_s")),
                 _f(mem / 2**20 if mem else None, "{:.0f}"), _f(t.get("step_ms")),
                 _f(r.get("speedup_jax_over_torch"), "{:.2f}")])
  return _table("Scaling: joint train step", [
      "axis", "value", "batch", "coarse -> fine", "window", "ST-points", "JAX ms", "compile s",
      "JAX mem MiB", "torch ms", "speed-up"], rows)


def _scaling_samples(rows_in: list) -> list:
  rows = [[str(r["value"]), _f(r["jax"]["time_s"], "{:.2f}"), _f(r["jax"]["fine_maps_per_s"]),
           _f(r.get("torch", {}).get("time_s"), "{:.2f}"),
           _f(r.get("speedup_jax_over_torch"), "{:.2f}")] for r in rows_in]
  return (_table("Scaling: samples per map (DDIM)",
                 ["samples", "JAX s", "JAX fine maps/s", "torch s", "speed-up"], rows)
          + _row_notes(rows_in))


def _default(d: dict) -> list:
  """The `default` entry: the default config's train, sampling and split, JAX only."""
  lines = [f"## Default config `{d['config']}` (JAX only)", "",
           "What `python -m diffrecon_jax.main --config=configs/nytaxi.py` trains and evaluates "
           "(the tables above time the paper's architecture, which the PyTorch twin mirrors).",
           ""]
  if d.get("train"):
    lines += _train(d["train"], "Default config: train step")
  if d.get("sampling"):
    points = sorted({str(r.get("sampler", {}).get("point", "-")) for r in d["sampling"]})
    lines += _sampling(d["sampling"], "Default config: sampling (point estimate: "
                       + ", ".join(points) + ")")
  if d.get("split"):
    lines += _split(d["split"], "Default config: whole test split (real `reconstruct`)")
  return lines


# Sections in report order: (results.json key, renderer).
_SECTIONS = (("train", _train), ("components", _components), ("sampling", _sampling),
             ("split", _split), ("scaling", _scaling), ("scaling_samples", _scaling_samples),
             ("default", _default))


def markdown(results: dict) -> str:
  """results.md of a results dict: header, one table per section present, then the notes."""
  lines = _header(results)
  for key, render in _SECTIONS:
    if results.get(key):
      lines += render(results[key])
  for note in results.get("notes", []):
    lines.append(f"- {note}")
  return "\n".join(lines) + "\n"


def plot(results: dict, out: pathlib.Path) -> Optional[str]:
  """out/scaling.png: time against each scaling axis; returns a note when matplotlib is
  missing (None otherwise, also when there is nothing to plot)."""
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    return "matplotlib is not installed: scaling plot skipped (tables above hold the numbers)"
  rows = results.get("scaling", []) + results.get("scaling_samples", [])
  axes = [a for a in ("grid", "history", "batch", "n_samples") if any(r["axis"] == a for r in rows)]
  if not axes:
    return None
  fig, ax = plt.subplots(1, len(axes), figsize=(4 * len(axes), 3.2))
  ax = np.atleast_1d(ax)
  for k, a in zip(ax, axes):
    pts = [r for r in rows if r["axis"] == a and "jax" in r and "skipped" not in r["jax"]]
    xs = [r.get("st_points", r["value"]) if a == "grid" else r["value"] for r in pts]
    key = "time_s" if a == "n_samples" else "step_ms"
    for fw in ("jax", "torch"):
      ys = [r.get(fw, {}).get(key) for r in pts]
      good = [(x, y) for x, y in zip(xs, ys) if y]
      if good:
        k.plot(*zip(*good), "o-", label=fw)
    k.set_xlabel("ST-points" if a == "grid" else a)
    k.set_ylabel("s per sampling call" if a == "n_samples" else "ms per joint step")
    k.set_xscale("log")
    k.set_yscale("log")
    k.legend()
  fig.tight_layout()
  fig.savefig(out / "scaling.png", dpi=120)
  plt.close(fig)
  return None


def write(results: dict, out: pathlib.Path) -> None:
  """out/results.json and out/results.md (the suite rewrites both after every section)."""
  add_mfu(results)
  (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
  (out / "results.md").write_text(markdown(results))


def check(results_json: pathlib.Path) -> list:
  """Unified diff lines between results.md beside `results_json` and its re-rendering
  (empty when they are equal)."""
  md_path = results_json.with_name("results.md")
  old = md_path.read_text().splitlines(keepends=True)
  new = markdown(json.loads(results_json.read_text())).splitlines(keepends=True)
  return list(difflib.unified_diff(old, new, str(md_path), "re-rendered"))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description="Re-renders results.md (and scaling.png) from a "
                              "benchmark results.json.")
  p.add_argument("results", type=pathlib.Path, help="a results.json written by benchmarks.run")
  p.add_argument("--check", action="store_true",
                 help="compare with results.md beside it; exit 1 and print the diff if it differs")
  p.add_argument("--out", type=pathlib.Path, default=None,
                 help="write results.md (and scaling.png) into this folder instead of stdout")
  args = p.parse_args(argv)
  if args.check:
    diff = check(args.results)
    sys.stdout.writelines(diff)
    print(f"{args.results.with_name('results.md')}: "
          + ("differs from its re-rendering" if diff else "equals its re-rendering"))
    return 1 if diff else 0
  results = json.loads(args.results.read_text())
  if args.out is None:
    sys.stdout.write(markdown(results))
    return 0
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "results.md").write_text(markdown(results))
  # Only draws; the note for a missing matplotlib is part of results.json when the run lacked it.
  plot(results, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
