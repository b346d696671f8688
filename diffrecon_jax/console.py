"""Where log lines go: the project's own on the console, everything in workdir/log.txt.

Orbax, JAX and absl log hundreds of INFO lines per run (every checkpoint save is ~40 lines of
"Creating tmp directory", "Save Finalize", throughput figures, ...). They bury the lines a user
reads: the training progress (phase, step, losses, steps/s, ETA), the per-pattern evaluation
results, the paths written and the warnings. `setup(workdir)` routes them:

  console (stderr)   records logged from this package at INFO and above; other libraries'
                     records at WARNING and above, except Orbax's, shown from ERROR (its
                     warnings restate the options this package chose, e.g. "Given directory is
                     read only" on every evaluation), and asyncio's, never shown (see _QUIETER);
  workdir/log.txt    every record at INFO and above, in absl's format (appended; process i > 0
                     of a multi-host job writes log.<i>.txt).

Exceptions Python cannot raise (`sys.unraisablehook`: e.g. the hundreds of pending TensorStore
reads Orbax abandons when one array file of a damaged checkpoint is missing) go to the log file
too, the first `_MAX_UNRAISABLE` of them.

`main` calls it; a notebook calls it before `run.run` for the same console.
"""
from __future__ import annotations

import atexit
import contextlib
import logging
import os
import pathlib
import sys
import tempfile
import time

from absl import logging as absl_logging

from diffrecon_jax import paths

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# Libraries held to a higher console level: (logger-name prefix, path fragment, lowest level
# shown). Orbax's warnings restate the options this package chose; asyncio's errors ("Future
# exception was never retrieved") are the reads Orbax abandons on a damaged checkpoint, which
# `train` reports itself in one line.
_QUIETER = (("orbax", os.sep + "orbax" + os.sep, logging.ERROR),
            ("asyncio", None, logging.CRITICAL + 1))
LOG_NAME = "log.txt"
# `extra=FILE_ONLY` on a log call keeps that record off the console (e.g. the traceback of an
# error whose one-line message the console already shows).
FILE_ONLY = {"diffrecon_file_only": True}


def is_project_record(record: logging.LogRecord) -> bool:
  """True for records logged from this package (absl records carry the caller's path, all
  under the one 'absl' logger name; Python loggers carry the module name)."""
  return (record.name.startswith("diffrecon_jax")
          or os.path.abspath(record.pathname).startswith(_PACKAGE_DIR))


class ConsoleFilter(logging.Filter):
  """Lets through what a user reads on the console (see the module docstring)."""

  def filter(self, record: logging.LogRecord) -> bool:
    if getattr(record, "diffrecon_file_only", False):
      return False
    if is_project_record(record):
      return record.levelno >= logging.INFO
    for name, fragment, level in _QUIETER:
      if record.name.startswith(name) or (fragment and fragment in record.pathname):
        return record.levelno >= level
    return record.levelno >= logging.WARNING


_MAX_UNRAISABLE = 20
_unraisable_count = 0


def _log_unraisable(unraisable) -> None:
  """sys.unraisablehook: one file-only log line per exception, the first _MAX_UNRAISABLE."""
  global _unraisable_count
  _unraisable_count += 1
  if _unraisable_count > _MAX_UNRAISABLE:
    return
  exc = unraisable.exc_value
  first = (str(exc).strip().splitlines() or [""])[0][:200]
  logging.getLogger("diffrecon_jax.unraisable").info(
      "exception ignored in %r: %s: %s%s", unraisable.object, type(exc).__name__, first,
      " (further ones not logged)" if _unraisable_count == _MAX_UNRAISABLE else "",
      extra=FILE_ONLY)


class _ConsoleFormatter(logging.Formatter):
  """`HH:MM:SS message`, and `HH:MM:SS WARNING: message` from WARNING up."""

  def format(self, record: logging.LogRecord) -> str:
    stamp = time.strftime("%H:%M:%S", time.localtime(record.created))
    level = "" if record.levelno < logging.WARNING else f"{record.levelname}: "
    text = f"{stamp} {level}{record.getMessage()}"
    if record.exc_info:
      text += "\n" + self.formatException(record.exc_info)
    return text


class _StderrHandler(logging.StreamHandler):
  """A stream handler on whatever sys.stderr is at each record (a notebook kernel or a test
  may replace it after setup)."""

  def emit(self, record: logging.LogRecord) -> None:
    self.stream = sys.stderr
    super().emit(record)


# Remote log files (a bucket workdir) and the local spool files the handler writes them from.
_SPOOLS = {}


def _spool_for(path) -> str:
  """The local file the log handler appends to: `path` itself when local; for a remote `path`,
  a local spool file (seeded with the remote log, so a resumed run appends to it) that `sync`
  copies to `path`."""
  if paths.is_local(path):
    return str(path)
  folder = tempfile.mkdtemp(prefix="diffrecon_jax_log_")
  local = os.path.join(folder, path.name)
  if path.exists():
    pathlib.Path(local).write_bytes(path.read_bytes())
  if not _SPOOLS:
    atexit.register(sync)
  _SPOOLS[str(path)] = local
  return local


def sync() -> None:
  """Copies every remote log file's spool to the workdir (at exit, and after each mode of a
  run); local log files are written in place and need nothing."""
  for h in logging.getLogger().handlers:
    if getattr(h, "_diffrecon_console", False):
      h.flush()
  for remote, local in _SPOOLS.items():
    try:
      paths.as_path(remote).write_bytes(pathlib.Path(local).read_bytes())
    except OSError as err:  # a log that cannot be copied must not end the run
      sys.stderr.write(f"could not copy the log to {remote}: {err}\n")


def close() -> None:
  """Copies the remote logs (`sync`) and removes the handlers `setup` added (a notebook or a
  test that is done with a workdir)."""
  sync()
  _SPOOLS.clear()
  root = logging.getLogger()
  for h in list(root.handlers):
    if getattr(h, "_diffrecon_console", False):
      root.removeHandler(h)
      h.close()


@contextlib.contextmanager
def errors_end_the_program(program: str, log_path):
  """A bad setting, input or file inside the block (ValueError, FileNotFoundError) ends a
  command module with one line, "<program>: error: <message>  (traceback in <log_path>)"; the
  traceback goes to the log file only (`setup`'s path). The commands beside `main`
  (experiments, short_series, error_sources, train_seeds) wrap their work in it."""
  try:
    yield
  except (ValueError, FileNotFoundError) as e:
    absl_logging.info("stopped by %s", type(e).__name__, exc_info=True, extra=FILE_ONLY)
    raise SystemExit(f"{program}: error: {e}  (traceback in {log_path})") from None


def setup(workdir, process_index: int = 0) -> pathlib.Path:
  """Routes log records: project lines (and warnings) to stderr, everything to the log file.

  Replaces absl's handler and other console handlers on the root logger, and any handlers an
  earlier `setup` added (so calling it again, e.g. from a notebook cell, does not double the
  lines). Returns the log
  file's path.
  """
  sync()  # an earlier setup's remote log is complete: copy it before its handler goes
  _SPOOLS.clear()
  wd = paths.as_path(workdir)
  wd.mkdir(parents=True, exist_ok=True)
  path = wd / (LOG_NAME if process_index == 0 else f"log.{process_index}.txt")
  local = _spool_for(path)  # the file the handler appends to (a bucket has no append)
  root = logging.getLogger()
  consoles = (sys.stderr, sys.stdout, sys.__stderr__, sys.__stdout__)
  for h in list(root.handlers):
    # Ours from an earlier call, absl's, and any other handler printing to the console (a
    # notebook kernel may have one from logging.basicConfig): they would print the chatter.
    if (getattr(h, "_diffrecon_console", False) or h is absl_logging.get_absl_handler()
        or (type(h) is logging.StreamHandler and h.stream in consoles)):
      root.removeHandler(h)
      if isinstance(h, logging.FileHandler):
        h.close()
  console = _StderrHandler(sys.stderr)
  console.addFilter(ConsoleFilter())
  console.setFormatter(_ConsoleFormatter())
  log_file = logging.FileHandler(local, mode="a", encoding="utf-8")
  log_file.setLevel(logging.INFO)
  log_file.setFormatter(absl_logging.PythonFormatter())
  for h in (console, log_file):
    h._diffrecon_console = True  # pylint: disable=protected-access
    root.addHandler(h)
  # INFO must reach the handlers (absl's default verbosity may be WARNING outside `app.run`);
  # a more verbose setting (--verbosity=1) is kept.
  if root.level == logging.NOTSET or root.level > logging.INFO:
    root.setLevel(logging.INFO)
  sys.unraisablehook = _log_unraisable
  absl_logger = logging.getLogger("absl")
  if absl_logger.level > logging.INFO:
    absl_logger.setLevel(logging.INFO)
  return path
