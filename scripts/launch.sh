#!/usr/bin/env bash
# `./run.sh launch STAGE [ARGS...]`: run a stage (or `run`, the whole pipeline) on this node,
# one worker per GPU or one per tensor-parallel group, ranks from SLURM/RANK when present.
# It is `python -m guidealign.launch` in the project's environment; see guidealign/launch.py
# and `scripts/launch.sh --help`. Example: scripts/launch.sh --dry-run detect -w runs/x
#
# Environment: GUIDEALIGN_PYTHON (the interpreter: a path, or a command on PATH; default GUIDEALIGN_VENV/bin/python,
# GUIDEALIGN_VENV defaulting to .venv; a relative one is in the repository, as for run.sh).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${GUIDEALIGN_VENV:-$root/.venv}
case "$venv" in /*) ;; *) venv=$root/$venv ;; esac  # relative: in the repository, as run.sh reads it
py=${GUIDEALIGN_PYTHON:-$venv/bin/python}
# a bare command name (GUIDEALIGN_PYTHON=python3: a container's own interpreter) is looked up
# on PATH, as the shell runs it; `-x` alone took it for a file in this directory and refused it
[[ $py == */* ]] || py=$(command -v -- "$py" || echo "$py")
if [[ ! -x $py ]]; then
  echo "launch: no Python environment at $py: run ./run.sh setup first, once, before the job" \
       "(GUIDEALIGN_EXTRA=gpu on GPU nodes); launch never installs" >&2
  exit 1
fi
exec "$py" -m guidealign.launch "$@"
