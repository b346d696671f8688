# Sourced by the launch scripts: --dry-run printing and the virtual environment they install into.
# Written for bash 3.2 as well (the bash of macOS laptops): empty arrays are expanded with
# ${a[@]+"${a[@]}"} because `set -u` rejects "${a[@]}" there.

DRY_RUN="${DRY_RUN:-0}"
PY="${PYTHON:-python3}"  # the interpreter a virtual environment is made from.

run() {  # runs its arguments, or with --dry-run prints them as one shell-quoted line
  if ((DRY_RUN)); then
    printf '%q ' "$@" | sed 's/ $//'
    echo
  else
    "$@"
  fi
}

# The last command: `exec`, so the signals that stop a job (SIGTERM on preemption) reach it.
run_last() {
  if ((DRY_RUN)); then
    run "$@"
  else
    exec "$@"
  fi
}

# Makes (or reuses) the virtual environment $1 and installs this checkout into it, editable, with
# the extras $2 (e.g. "cuda12" or "bench,cuda12"): the package's pinned dependencies never touch
# the machine's own Python.
install_into_venv() {
  run "$PY" -m venv "$1"
  run "$1/bin/python" -m pip install -q --upgrade pip
  run "$1/bin/python" -m pip install -q -e ".[$2]"
}
