"""The path layer: every file of a run's workdir is read and written through here, so a workdir
may be a bucket (`etils.epath`) as well as a local folder.

A workdir may be a local folder (relative paths are taken from the current directory) or any
URI epath reads, e.g. `gs://BUCKET/runs/nytaxi` on a Cloud TPU VM (gs:// needs `gcsfs`, in the
`tpu` extra). Orbax writes the checkpoints through epath as well. Writers that need a real local
file (netCDF4, the log file) write to a local spool file and copy it to the workdir
(`local_copy`, console.py); appends to a remote file rewrite it (buckets have no append).
"""
from __future__ import annotations

import contextlib
import io
import os
import pathlib
import shutil
import tempfile
from typing import Iterator

import numpy as np
from etils import epath


def is_local(path) -> bool:
  """Whether `path` is on this machine's file system (no URI scheme)."""
  return "://" not in os.fspath(path)


def as_path(path):
  """`path` (str or os.PathLike) as a path object, not resolved: a `pathlib.Path` when local
  (so local runs behave exactly as plain pathlib code), an `epath.Path` for a URI. Both have
  the methods used here (open, read/write_text/bytes, mkdir, exists, replace, glob)."""
  text = os.fspath(path)
  return pathlib.Path(text) if is_local(text) else epath.Path(text)


def resolve(path):
  """`as_path(path)`, a local path made absolute ("~" expanded, from the current directory)."""
  text = os.fspath(path)
  if is_local(text):
    return pathlib.Path(os.path.abspath(os.path.expanduser(text)))
  return epath.Path(text)


def write_text_atomic(path, text: str) -> None:
  """Writes through a temporary sibling renamed over `path`: a reader (or a crash) never sees
  a half-written file."""
  path = as_path(path)
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


def append_text(path, text: str) -> None:
  """Appends `text` to `path` (created if missing); a remote file is rewritten whole."""
  path = as_path(path)
  if is_local(path):
    with path.open("a") as f:
      f.write(text)
    return
  old = path.read_text() if path.exists() else ""
  path.write_text(old + text)


def save_npz(path, compressed: bool = True, **arrays) -> None:
  """np.savez(_compressed) of `arrays` to `path` (any epath)."""
  buffer = io.BytesIO()
  (np.savez_compressed if compressed else np.savez)(buffer, **arrays)
  as_path(path).write_bytes(buffer.getvalue())


def load_npz(path) -> dict:
  """{name: array} of an .npz at `path` (any epath); no pickles."""
  with np.load(io.BytesIO(as_path(path).read_bytes()), allow_pickle=False) as z:
    return {k: z[k] for k in z.files}


def save_figure(fig, path, **kwargs) -> None:
  """matplotlib `fig.savefig` to `path` (any epath); the format from its suffix."""
  buffer = io.BytesIO()
  fig.savefig(buffer, format=as_path(path).suffix.lstrip(".") or "png", **kwargs)
  as_path(path).write_bytes(buffer.getvalue())


@contextlib.contextmanager
def local_copy(path) -> Iterator[str]:
  """A local file name to write `path` with a library that needs one (netCDF4): `path` itself
  when local, else a temporary file copied to `path` when the block ends without error."""
  path = as_path(path)
  if is_local(path):
    yield os.fspath(path)
    return
  folder = tempfile.mkdtemp(prefix="diffrecon_jax_")
  local = os.path.join(folder, path.name)
  try:
    yield local
    path.write_bytes(pathlib.Path(local).read_bytes())
  finally:
    shutil.rmtree(folder, ignore_errors=True)
