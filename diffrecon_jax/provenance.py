"""What produced a run: package versions, backend and devices, code commit, command line.

Numbers move with package versions (WORKSPACE.md: one environment repeats itself exactly,
another does not), so every run records its provenance: `run.run` appends one entry per command
to workdir/provenance.json ({"runs": [oldest, ..., newest]}: a resumed training, a later
`--mode=evaluate` or `--mode=reconstruct` keep the earlier entries) and every results.json it
writes carries the entry of the command that wrote it (`provenance`). To compare two runs:

  python -m diffrecon_jax.provenance runs/a runs/b       # workdirs or results.json files

prints each field that differs (package versions, backend, devices, commit, command line).
"""
from __future__ import annotations

import datetime
import importlib.metadata
import json
import pathlib
import platform
import socket
import subprocess
import sys
from typing import Optional

from diffrecon_jax import paths

FILE_NAME = "provenance.json"
# Distributions whose versions decide the numbers (the design card's stack and what it reads).
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "scipy",
            "ml-collections", "tensorflow-datasets", "absl-py", "etils", "netCDF4", "zarr",
            "diffrecon_jax")
_REPO = pathlib.Path(__file__).resolve().parent.parent
# Fields that differ between any two runs and say nothing about how the numbers were made.
_ALWAYS_DIFFERENT = ("started", "hostname")


def package_versions(names=PACKAGES) -> dict:
  """{distribution: version, or None when it is not installed}."""
  out = {}
  for name in names:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def git_state(root: pathlib.Path = _REPO) -> dict:
  """{"commit", "dirty"} of the checkout the package runs from; both None when it is not a git
  checkout or git is missing (an installed package): provenance never stops a run."""
  def git(*args):
    return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True,
                          timeout=10, check=True).stdout
  try:
    if git("rev-parse", "--show-toplevel").strip() != str(root):
      return {"commit": None, "dirty": None}  # inside some other repository
    commit = git("rev-parse", "HEAD").strip()
    dirty = bool(git("status", "--porcelain", "--untracked-files=no").strip())
  except (OSError, subprocess.SubprocessError):
    return {"commit": None, "dirty": None}
  return {"commit": commit, "dirty": dirty}


def devices() -> dict:
  """JAX's backend, device kind and counts, process index and count."""
  import jax
  local = jax.local_devices()
  return {"backend": jax.default_backend(),
          "device_kind": local[0].device_kind if local else None,
          "local_device_count": len(local), "device_count": jax.device_count(),
          "process_index": jax.process_index(), "process_count": jax.process_count()}


def collect(argv: Optional[list] = None, mode: str = "") -> dict:
  """The provenance of the current process (argv: the command line; default sys.argv)."""
  return {"started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "argv": list(sys.argv if argv is None else argv), "mode": mode,
          "python": platform.python_version(), "platform": platform.platform(),
          "hostname": socket.gethostname(), "packages": package_versions(),
          **devices(), "git": git_state()}


def record(workdir, info: dict) -> pathlib.Path:
  """Appends `info` to workdir/provenance.json; returns its path."""
  path = paths.as_path(workdir) / FILE_NAME
  runs = []
  if path.is_file():
    try:
      runs = json.loads(path.read_text()).get("runs", [])
    except (ValueError, AttributeError):
      runs = []  # a damaged file is replaced, not a reason to stop the run
  path.write_text(json.dumps({"runs": runs + [info]}, indent=1))
  return path


def latest(path) -> dict:
  """The newest provenance of a workdir (its provenance.json) or of a results.json file."""
  path = paths.as_path(path)
  if path.is_dir():
    path = path / FILE_NAME
  if not path.is_file():
    raise FileNotFoundError(f"{path} does not exist: no provenance recorded there")
  doc = json.loads(path.read_text())
  if "runs" in doc:
    return doc["runs"][-1]
  if "provenance" in doc:
    return doc["provenance"]
  raise ValueError(f"{path} holds no provenance (neither provenance.json nor a results.json "
                   f"written with it)")


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def differences(a: dict, b: dict) -> dict:
  """{field: (value in a, value in b)} of every field that differs, nested ones dotted
  ("packages.jax"); start time and host name are left out."""
  fa, fb = _flat(a), _flat(b)
  return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb))
          if k not in _ALWAYS_DIFFERENT and fa.get(k) != fb.get(k)}


def main(argv=None) -> int:
  import argparse
  parser = argparse.ArgumentParser(description="Differences between two runs' provenance.")
  parser.add_argument("a", help="a workdir or a results.json")
  parser.add_argument("b", help="a workdir or a results.json")
  args = parser.parse_args(argv)
  diff = differences(latest(args.a), latest(args.b))
  if not diff:
    print("same provenance (packages, backend, devices, commit, command line)")
  for key, (va, vb) in diff.items():
    print(f"{key}: {va!r} -> {vb!r}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
