#!/bin/bash
# Submit the pipeline stage by stage: map stages as job arrays of NODES tasks, reduce stages
# as one-node jobs, each job starting only after the previous one succeeded
# (--dependency=afterok; --kill-on-invalid-dep=yes cancels the rest of the chain when a job
# fails, instead of leaving it pending forever). No job ever waits for a task that SLURM has
# not started, so the chain cannot deadlock.
#
#   examples/slurm/submit-stages.sh NODES -c configs/gpu-paper.yaml -w /shared/runs/paper
#
# Extra sbatch options go in SBATCH_ARGS (e.g. "--gpus-per-node=8 --partition=gpu").
# SUBMIT=echo prints the sbatch commands instead of submitting them.
# PUSH=1 chains `push` after sft, which pushes what `run` pushes at its end (the config or --set
# needs push.repo_id and/or push.model_repo_id; `run` pushes by itself when set, this chain only
# when asked).
# Before: GUIDEALIGN_EXTRA=gpu ./run.sh setup; ./run.sh gx models fetch -c CONFIG.
set -euo pipefail
if [[ $# -lt 3 ]]; then
  echo "usage: $0 NODES -c CONFIG -w WORKDIR [guidealign options]" >&2
  exit 2
fi
nodes=$1; shift
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
script=$here/guidealign.sbatch
# SLURM runs a spooled copy of the batch script in the submit directory (relative -c/-w paths
# resolve there): tell it where the launcher is, whatever directory this is called from
# (shell-quoted: a repository path with spaces stays one word)
if [[ -z ${GUIDEALIGN_LAUNCH:-} ]]; then
  GUIDEALIGN_LAUNCH=$(printf '%q' "$(cd "$here/../.." && pwd)/scripts/launch.sh")
  export GUIDEALIGN_LAUNCH
fi
submit=${SUBMIT:-sbatch}
read -r -a extra <<< "${SBATCH_ARGS:-}"
dep=()
n=0

step() {  # step map|reduce STAGE...: submit one job, chained after the previous one
  local kind=$1; shift
  local shape=(--nodes=1)
  [[ $kind == map ]] && shape+=(--array="0-$((nodes - 1))")
  local out
  out=$("$submit" --parsable --kill-on-invalid-dep=yes "${shape[@]}" "${dep[@]}" "${extra[@]}" \
        "$script" "$@")
  n=$((n + 1))
  local id=${out%%;*}
  [[ $submit == echo ]] && id="JOB$n"
  echo "$kind $1: $out" >&2
  dep=(--dependency="afterok:$id")
}

step reduce ingest "$@"
step map detect "$@"
step map guidelines "$@"
step reduce library "$@"
step reduce train-retriever "$@"
step reduce index "$@"
step map retrieve "$@"
step map respond "$@"
step reduce sft "$@"
if [[ ${PUSH:-0} == 1 ]]; then
  # `push` with no WHAT: what `run` pushes (push.what, the model too with push.model_repo_id);
  # online (the batch script sets HF_HUB_OFFLINE=1 otherwise; sbatch exports this environment)
  GUIDEALIGN_ALLOW_DOWNLOAD=1 step reduce push "$@"
fi
