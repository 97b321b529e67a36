"""launch on a GPU node, shown with --dry-run and a stand-in nvidia-smi: a tensor-parallel engine
over MIG devices is refused before any work (it failed at the first engine start, after rank 0
had ingested everything), --gpus ids outside the job's CUDA_VISIBLE_DEVICES are refused (workers
went to other jobs' GPUs), and the multi-node sbatch script keeps node 0 alive through SFT."""
from __future__ import annotations

from pathlib import Path

from test_executors_launch import launch, plan_lines

REPO = Path(__file__).resolve().parents[1]


def test_tensor_parallel_over_mig_devices_is_refused_by_the_plan():
    migs = ",".join(f"MIG-{k}aaa0000-0000-0000-0000-00000000000{k}" for k in range(8))
    p = launch("--dry-run", "detect", "-w", "r", "--set", "engine.tensor_parallel_size=4",
               env={"CUDA_VISIBLE_DEVICES": migs}, check=False)
    assert p.returncode == 2 and "MIG devices" in p.stderr, p.stderr
    # one engine per MIG device is planned as before
    plan = plan_lines(launch("--dry-run", "detect", "-w", "r", "--set", "engine.tensor_parallel_size=1",
                             env={"CUDA_VISIBLE_DEVICES": migs}))
    assert len(plan) == 8 and all("," not in w["env"]["CUDA_VISIBLE_DEVICES"] for w in plan)


def test_gpus_outside_the_jobs_visible_devices_are_refused():
    p = launch("--dry-run", "--gpus", "0,1", "retrieve", "-w", "r", env={"CUDA_VISIBLE_DEVICES": "4,5"},
               check=False)
    assert p.returncode == 2 and "0,1" in p.stderr and "CUDA_VISIBLE_DEVICES is 4,5" in p.stderr, p.stderr
    plan = plan_lines(launch("--dry-run", "--gpus", "5", "retrieve", "-w", "r", env={"CUDA_VISIBLE_DEVICES": "4,5"}))
    assert [w["env"]["CUDA_VISIBLE_DEVICES"] for w in plan] == ["5"]
    # ids in another form than the inherited ones (UUIDs vs indices) are not compared
    plan = plan_lines(launch("--dry-run", "--gpus", "GPU-aaaa", "retrieve", "-w", "r",
                             env={"CUDA_VISIBLE_DEVICES": "0,1"}))
    assert [w["env"]["CUDA_VISIBLE_DEVICES"] for w in plan] == ["GPU-aaaa"]
    # without an inherited CUDA_VISIBLE_DEVICES, --gpus names the node's GPUs as before
    plan = plan_lines(launch("--dry-run", "--gpus", "0,1", "retrieve", "-w", "r"))
    assert [w["env"]["CUDA_VISIBLE_DEVICES"] for w in plan] == ["0", "1"]


def test_the_multi_node_script_keeps_node_0_through_sft():
    script = (REPO / "examples" / "slurm" / "guidealign.sbatch").read_text()
    line = next(x for x in script.splitlines() if x.strip().startswith("exec srun"))
    assert "--kill-on-bad-exit=1" in line and "--wait=0" in line
