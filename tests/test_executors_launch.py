"""``guidealign launch``: GPU detection, worker plans (per GPU / tensor-parallel / CPU), ranks
from SLURM, and a real run of two workers over real shards with fake GPU ids."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from guidealign.ingest.run import IngestConfig, ingest
from guidealign.core.gpu import visible_gpus as detect_gpus
from guidealign.shards import read_marker

REPO = Path(__file__).resolve().parents[1]
BASE_ENV = {k: v for k, v in os.environ.items()
            if not k.startswith("SLURM_") and k not in ("RANK", "WORLD_SIZE", "CUDA_VISIBLE_DEVICES")}


def launch(*args, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "guidealign.launch", *args],
                       env={**BASE_ENV, **(env or {})}, capture_output=True, text=True, timeout=300,
                       cwd=REPO)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def plan_lines(p) -> list[dict]:
    """Parse dry-run lines: ``env -u VAR ...`` (removed variables), assignments, the command."""
    out = []
    for line in p.stdout.splitlines():
        words = line.split()
        unset = []
        if words and words[0] == "env":
            words = words[1:]
            while words and words[0] == "-u":
                unset.append(words[1])
                words = words[2:]
        env = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-")
                   and w.split("=", 1)[0].isupper())
        argv = [w for w in words if not ("=" in w and w.split("=", 1)[0].isupper())]
        out.append({"env": env, "argv": argv, "unset": unset})
    return out


def argv_rank(w: dict) -> tuple[str, str]:
    a = w["argv"]
    return a[a.index("--rank") + 1], a[a.index("--world-size") + 1]


DIST = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def test_detect_gpus_from_cuda_visible_devices_and_nvidia_smi(tmp_path):
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": "0,1,3"}) == ["0", "1", "3"]
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": "GPU-aa,GPU-bb"}) == ["GPU-aa", "GPU-bb"]
    for none in ("", "-1", "NoDevFiles"):
        assert detect_gpus({"CUDA_VISIBLE_DEVICES": none}) == []
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\n[ \"$1\" = -L ] || exit 9\n"
                    "echo 'GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-1)'\n"
                    "echo 'GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-2)'\n"
                    "echo '  MIG 1g.10gb Device 0: (UUID: MIG-3)'\n")
    fake.chmod(0o755)
    # GPU 1 is in MIG mode: a process sees one MIG device, so each is a worker of its own,
    # named by its UUID (the parent's index would give its worker only the first one)
    assert detect_gpus({"PATH": str(tmp_path)}) == ["0", "MIG-3"]
    assert detect_gpus({"PATH": str(tmp_path / "nowhere")}) == []


def test_one_worker_per_gpu():
    p = launch("--dry-run", "detect", "-w", "runs/x", env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    plan = plan_lines(p)
    assert [w["env"]["CUDA_VISIBLE_DEVICES"] for w in plan] == ["0", "1", "2", "3"]
    assert all(set(w["env"]) == {"CUDA_VISIBLE_DEVICES"} for w in plan)  # rank: CLI only
    for r, w in enumerate(plan):
        assert w["argv"][-4:] == ["--rank", str(r), "--world-size", "4"]
        assert w["argv"][1:6] == ["-m", "guidealign", "detect", "-w", "runs/x"]


def test_an_unknown_stage_is_a_usage_error_before_any_plan():
    """`launch --dry-run detekt` planned workers that would each fail on click's "No such
    command"."""
    p = launch("--dry-run", "detekt", "-w", "runs/x", env={"CUDA_VISIBLE_DEVICES": "0,1"}, check=False)
    assert p.returncode == 2 and "no stage 'detekt'" in p.stderr and "detect" in p.stderr
    assert not plan_lines(p)


def test_tensor_parallel_from_config(tmp_path):
    cfg = tmp_path / "tp.yaml"
    cfg.write_text("engine:\n  tensor_parallel_size: 2\n")
    p = launch("--dry-run", "respond", "-w", "r", "-c", str(cfg), env={"CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    plan = plan_lines(p)
    assert [w["env"]["CUDA_VISIBLE_DEVICES"] for w in plan] == ["4,5", "6,7"]
    assert [argv_rank(w) for w in plan] == [("0", "2"), ("1", "2")]
    # one engine over the whole node
    p = launch("--dry-run", "respond", "-w", "r", "--set", "engine.tensor_parallel_size=4",
               env={"CUDA_VISIBLE_DEVICES": "4,5,6,7"})
    plan = plan_lines(p)
    assert len(plan) == 1 and plan[0]["env"]["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"
    assert plan[0]["argv"][-4:] == ["--rank", "0", "--world-size", "1"]
    # more tensor-parallel GPUs than the node has: a clear error
    p = launch("--dry-run", "respond", "-w", "r", "--set", "engine.tensor_parallel_size=8",
               env={"CUDA_VISIBLE_DEVICES": "0,1"}, check=False)
    assert p.returncode != 0 and "needs 8 GPUs" in p.stderr


def test_ranks_from_slurm_array_and_srun():
    # array task 1 of 3 (submitted as --array=4-6) with 2 GPUs: global ranks 2, 3 of 6
    env = {"CUDA_VISIBLE_DEVICES": "0,1", "SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3",
           "SLURM_ARRAY_TASK_MIN": "4"}
    plan = plan_lines(launch("--dry-run", "retrieve", "-w", "r", env=env))
    assert [argv_rank(w) for w in plan] == [("2", "6"), ("3", "6")]
    assert [w["env"]["CUDA_VISIBLE_DEVICES"] for w in plan] == ["0", "1"]
    # srun -N 2 --ntasks-per-node=1: task 1 of 2, no GPU -> one CPU worker of rank 1
    plan = plan_lines(launch("--dry-run", "retrieve", "-w", "r",
                             env={"CUDA_VISIBLE_DEVICES": "", "SLURM_PROCID": "1", "SLURM_NTASKS": "2",
                                  "SLURM_STEP_ID": "0"}))
    assert len(plan) == 1 and "CUDA_VISIBLE_DEVICES" not in plan[0]["env"]
    assert plan[0]["argv"][-4:] == ["--rank", "1", "--world-size", "2"]
    # the batch script of `sbatch -n 2` (PROCID 0 of 2, no step): refused, not half the shards
    p = launch("--dry-run", "retrieve", "-w", "r", check=False,
               env={"CUDA_VISIBLE_DEVICES": "", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert p.returncode != 0 and "not one of its tasks" in p.stderr and "srun" in p.stderr
    # ... unless the node's place is given: one node of one
    p = launch("--dry-run", "--nodes", "1", "retrieve", "-w", "r", check=False,
               env={"CUDA_VISIBLE_DEVICES": "", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"})
    assert p.returncode == 0, p.stderr


def test_single_process_stages_and_explicit_rank_refused():
    plan = plan_lines(launch("--dry-run", "index", "-w", "r", env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"}))
    assert len(plan) == 1 and plan[0]["env"]["CUDA_VISIBLE_DEVICES"] == "0,1,2,3"
    # the retriever trains on one device: the node's first GPU
    plan = plan_lines(launch("--dry-run", "train-retriever", "-w", "r",
                             env={"CUDA_VISIBLE_DEVICES": "4,5,6,7"}))
    assert len(plan) == 1 and plan[0]["env"]["CUDA_VISIBLE_DEVICES"] == "4"
    p = launch("--dry-run", "detect", "-w", "r", "--rank", "0", env={"CUDA_VISIBLE_DEVICES": "0"},
               check=False)
    assert p.returncode != 0 and "launch sets --rank" in p.stderr


def test_launch_runs_one_real_worker_per_fake_gpu(tmp_path):
    """Two fake GPU ids: two real `guidealign export` processes split the shards by rank."""
    src = tmp_path / "p.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"p{i}"}) + "\n" for i in range(20)))
    wd = tmp_path / "run"
    ingest([str(src)], wd, IngestConfig(shard_rows=4), progress=False)  # 5 shards
    logs = tmp_path / "logs"
    p = launch("--log-dir", str(logs), "export", "prompts", "-w", str(wd), "--no-progress",
               env={"CUDA_VISIBLE_DEVICES": "0,1"})
    assert "2 worker(s)" in p.stderr
    out = wd / "export" / "prompts"
    for i in range(5):
        m = read_marker(out, i)
        assert m is not None and m.stats["rank"] == i % 2 and m.stats["world_size"] == 2
    assert len({read_marker(out, i).stats["pid"] for i in range(5)}) == 2
    assert "rank 0/2: shards [0, 2, 4]" in (logs / "rank00000.log").read_text()
    assert "rank 1/2: shards [1, 3]" in (logs / "rank00001.log").read_text()
    # a worker that fails makes launch fail, with its rank named (both fail here: whichever
    # exits first is named, and the other is stopped if it is still running)
    p = launch("export", "nosuch", "-w", str(wd), env={"CUDA_VISIBLE_DEVICES": "0,1"}, check=False)
    assert p.returncode != 0
    assert "rank 0 exited with status 1" in p.stderr or "rank 1 exited with status 1" in p.stderr


def test_dry_run_on_8_gpus_shows_no_distributed_variables():
    """Node 1 of 2 (from RANK/WORLD_SIZE, as torchrun-style schedulers set them) with 8 GPUs:
    no worker gets RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*; they are removed (env -u)."""
    env = {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", "RANK": "1", "WORLD_SIZE": "2",
           "LOCAL_RANK": "0", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    single = ("ingest", "library", "train-retriever", "index", "sft", "push")  # (eval: a worker per engine)
    for stage in single:
        plan = plan_lines(launch("--dry-run", stage, "-w", "r", env=env))
        assert len(plan) == 1, (stage, plan)
        w = plan[0]
        assert not set(DIST) & set(w["env"]), (stage, w)
        assert set(w["unset"]) == {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
        assert argv_rank(w) == ("1", "2")
        assert w["env"]["CUDA_VISIBLE_DEVICES"] == ("0" if stage == "train-retriever" else
                                                    "0,1,2,3,4,5,6,7")
    # sharded stages: 8 workers, ranks 8..15 of 16 through the CLI only
    plan = plan_lines(launch("--dry-run", "detect", "-w", "r", env=env))
    assert [argv_rank(w) for w in plan] == [(str(8 + j), "16") for j in range(8)]
    assert all(not set(DIST) & set(w["env"]) and "RANK" in w["unset"] for w in plan)


def test_workers_do_not_inherit_distributed_variables():
    """What a real worker process sees: no RANK/LOCAL_RANK/WORLD_SIZE, its CUDA_VISIBLE_DEVICES."""
    from guidealign.launch import plan as make_plan

    launcher_env = dict(BASE_ENV, RANK="1", WORLD_SIZE="2", LOCAL_RANK="5", MASTER_PORT="1")
    workers = make_plan("index", ["-w", "r"], gpus=["3", "4"], tp=1, node_rank=1, nodes=2,
                        env=launcher_env)
    assert len(workers) == 1
    w = workers[0]
    seen = w.environ(launcher_env)
    assert not {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"} & set(seen)
    assert seen["CUDA_VISIBLE_DEVICES"] == "3,4" and seen["PATH"] == launcher_env["PATH"]


def test_launch_stops_sibling_workers_when_one_fails(tmp_path, monkeypatch):
    """Real processes: rank 1 fails at once; rank 0 (a stand-in for a worker waiting on an
    engine) would sleep for two minutes. launch stops it and records rank 1's failure."""
    from guidealign.launch import Worker, run_workers

    wd = tmp_path / "run"
    finished = tmp_path / "rank0-finished"
    hang = [sys.executable, "-c", f"import time; time.sleep(120); open({str(finished)!r}, 'w')"]
    fail = [sys.executable, "-c", "import sys; sys.exit(3)"]
    workers = [Worker(rank=0, world_size=2, local_rank=0, gpus=[], argv=hang),
               Worker(rank=1, world_size=2, local_rank=1, gpus=[], argv=fail)]
    code = run_workers(workers, workdir=str(wd), grace=5)
    assert code == 3
    marker = json.loads((wd / "_failed" / "rank-00001.json").read_text())
    assert "exited with status 3" in marker["error"]
    assert not (wd / "_failed" / "rank-00000.json").exists()  # stopped, not failed
    assert not finished.exists()  # rank 0 was stopped, not waited for


def test_a_worker_killed_by_a_signal_gives_the_shells_exit_status(tmp_path):
    """A worker killed by SIGTERM (SLURM preemption forwarded) made launch exit with -15 & 255 =
    241, a status no scheduler or shell reads as "terminated"; now 128 + 15 = 143."""
    from guidealign.launch import Worker, run_workers

    term = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)"]
    code = run_workers([Worker(rank=0, world_size=1, local_rank=0, gpus=[], argv=term)],
                       workdir=str(tmp_path / "run"), grace=5)
    assert code == 143
    marker = json.loads((tmp_path / "run" / "_failed" / "rank-00000.json").read_text())
    assert "killed by signal 15" in marker["error"]


def test_a_dead_worker_replaces_its_rank_s_failure_marker_of_an_earlier_attempt(tmp_path):
    """A requeued job's worker that dies before clearing its earlier attempt's marker (a crash
    at import) left only that old marker, which this attempt's ranks ignore (written before
    they started): they waited for the stall clock instead of failing fast."""
    import time

    from guidealign.launch import Worker, _record_failure
    from guidealign.shards.failure import failure_path, mark_failed

    wd = tmp_path / "run"
    w = Worker(rank=2, world_size=4, local_rank=0, gpus=[], argv=["python", "-m", "detect", "detect"])
    old = mark_failed(wd, 2, "attempt 0: out of memory")
    data = json.loads(old.read_text())
    data["created"] = 0.0
    old.write_text(json.dumps(data))
    started = time.time()
    _record_failure(str(wd), w, -9, started)
    now = json.loads(failure_path(wd, 2).read_text())
    assert "killed by signal 9" in now["error"] and now["created"] >= started
    # a marker the worker wrote itself in this attempt (its own error) is kept
    mark_failed(wd, 2, "ValueError: this attempt's own error")
    _record_failure(str(wd), w, 1, started)
    assert "this attempt's own error" in json.loads(failure_path(wd, 2).read_text())["error"]


def test_an_earlier_attempts_marker_under_a_fixed_run_id_does_not_stop_a_new_launch(tmp_path, monkeypatch):
    """With GUIDEALIGN_RUN_ID fixed and no SLURM job, a marker of an earlier attempt counts as
    this run's: a rank that reached its first wait before the failed rank's guard cleared it
    stopped, and so did every rank after it. launch clears the markers of the ranks it starts."""
    from guidealign.launch import Worker, run_workers
    from guidealign.shards.failure import mark_failed

    wd = tmp_path / "run"
    monkeypatch.setenv("GUIDEALIGN_RUN_ID", "exp1")
    for k in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(k, raising=False)
    old = mark_failed(wd, 1, "CUDA out of memory (yesterday)", stage="run", world_size=2)
    data = json.loads(old.read_text())
    data["created"] -= 86400
    old.write_text(json.dumps(data))
    waits = [sys.executable, "-c", "from guidealign.shards.failure import raise_if_failed; "
             f"raise_if_failed({str(wd)!r}, 'prompts')"]
    late = [sys.executable, "-c", "import time; time.sleep(3)"]  # the failed rank, not yet at its guard
    workers = [Worker(rank=0, world_size=2, local_rank=0, gpus=[], argv=waits),
               Worker(rank=1, world_size=2, local_rank=1, gpus=[], argv=late)]
    assert run_workers(workers, workdir=str(wd), grace=5) == 0
    assert not (wd / "_failed" / "rank-00001.json").exists()


LAUNCHER = r"""
import signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)  # as a non-interactive shell's `launch ... &` starts it
from guidealign.launch import Worker, run_workers
w = Worker(rank=0, world_size=1, local_rank=0, gpus=[], argv=[sys.executable, "-c", sys.argv[1]])
print("status", run_workers([w], grace=60), flush=True)
"""

WORKER = r"""
import pathlib, sys, time
try:  # the flag written inside the try: a Ctrl-C right after it is still the worker's to take
    pathlib.Path(sys.argv[1]).write_text("started")
    time.sleep(120)
except KeyboardInterrupt:
    pathlib.Path(sys.argv[1]).write_text("interrupted")
    sys.exit(130)
"""


def _signal_once_started(launcher: str, worker: str, flag, sig, after=None) -> str:
    """Run ``launcher`` (a script of one run_workers call) with ``worker``'s code, send it ``sig``
    once the worker wrote ``flag`` (its whole text: a file just created is still empty), then
    call ``after()`` if given; the launcher's output."""
    import subprocess
    import time

    p = subprocess.Popen([sys.executable, "-c", launcher, worker], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not flag.exists() or not flag.read_text():
            assert p.poll() is None and time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.05)
        p.send_signal(sig)
        if after is not None:
            after()
        out, _ = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    return out


def test_a_ctrl_c_forwarded_by_launch_reaches_workers_even_when_launch_ignores_it(tmp_path):
    """launch started with SIGINT ignored (a background job) started its workers before its own
    handler was in place, so they inherited the ignored SIGINT and the Ctrl-C it forwards
    (`kill -INT`) never stopped them."""
    import signal

    flag = tmp_path / "worker"
    out = _signal_once_started(LAUNCHER, WORKER.replace("sys.argv[1]", repr(str(flag))), flag, signal.SIGINT)
    assert flag.read_text() == "interrupted"
    assert "status 130" in out


def test_a_slurm_job_given_no_gpus_does_not_take_the_nodes_gpus(tmp_path):
    """Slurm sets CUDA_VISIBLE_DEVICES for the GPUs it allocates. A job given none, on a node
    without device isolation, found every GPU of the node through nvidia-smi and planned
    engines on them (other jobs' GPUs). It is refused with what to do; outside Slurm, or
    with the GPUs named, nvidia-smi's list is used as before."""
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\n[ \"$1\" = -L ] || exit 9\n"
                    + "".join(f"echo 'GPU {i}: NVIDIA H100 (UUID: GPU-{i})'\n" for i in range(8)))
    fake.chmod(0o755)
    path = f"{tmp_path}:{os.environ['PATH']}"
    p = launch("--dry-run", "detect", "-w", "r", env={"PATH": path, "SLURM_JOB_ID": "77"}, check=False)
    assert p.returncode != 0 and "was given no GPUs" in p.stderr
    assert len(plan_lines(launch("--dry-run", "detect", "-w", "r", env={"PATH": path}))) == 8
    plan = plan_lines(launch("--dry-run", "detect", "-w", "r",
                             env={"PATH": path, "SLURM_JOB_ID": "77", "CUDA_VISIBLE_DEVICES": "2,3"}))
    assert [w["env"]["CUDA_VISIBLE_DEVICES"] for w in plan] == ["2", "3"]
    # a site that leaves CUDA_VISIBLE_DEVICES unset and isolates the job's GPUs (cgroups) says
    # what it gave in SLURM_JOB_GPUS: nvidia-smi's list is the job's own
    assert len(plan_lines(launch("--dry-run", "detect", "-w", "r",
                                 env={"PATH": path, "SLURM_JOB_ID": "77", "SLURM_JOB_GPUS": "0,1,2,3,4,5,6,7"}))) == 8


PID_WORKER = r"""
import os, pathlib, sys, time
pathlib.Path(sys.argv[1]).write_text(str(os.getpid()))
time.sleep(120)
"""


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGHUP"])
def test_workers_stop_when_launch_dies_without_running_its_handler(tmp_path, sig):
    """Each worker has a session of its own, so a launch killed outright (the OOM killer,
    Slurm's KillWait) or hung up (its terminal closed) left its workers running, unwatched,
    with their engines on the GPUs."""
    import signal
    import subprocess
    import time

    flag = tmp_path / "worker"
    worker = PID_WORKER.replace("sys.argv[1]", repr(str(flag)))
    # SIGHUP at its default, as in a terminal's session: how the test suite was started (nohup
    # ignores it, and a launch started so keeps ignoring it) is no concern of this test
    launcher = "import signal\nsignal.signal(signal.SIGHUP, signal.SIG_DFL)\n" + LAUNCHER
    p = subprocess.Popen([sys.executable, "-c", launcher, worker], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not flag.exists() or not flag.read_text():
            assert p.poll() is None and time.monotonic() < deadline, "the worker did not start"
            time.sleep(0.05)
        pid = int(flag.read_text())
        p.send_signal(getattr(signal, sig))
        p.wait(timeout=60)
        deadline = time.monotonic() + 30
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid)
    finally:
        if p.poll() is None:
            p.kill()
        if flag.exists() and flag.read_text() and _alive(int(flag.read_text())):
            os.kill(int(flag.read_text()), signal.SIGKILL)


def test_a_stage_without_an_engine_gets_one_worker_per_gpu_under_a_tensor_parallel_config(tmp_path):
    """retrieve and export start no engine, yet were grouped by engine.tensor_parallel_size:
    2 workers of 4 GPUs on 8 (6 GPUs idle)."""
    cfg = tmp_path / "tp.yaml"
    cfg.write_text("engine:\n  tensor_parallel_size: 4\n")
    for stage in ("retrieve", "export"):
        plan = plan_lines(launch("--dry-run", stage, "-w", "r", "-c", str(cfg),
                                 env={"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}))
        assert [w["env"]["CUDA_VISIBLE_DEVICES"] for w in plan] == [str(g) for g in range(8)], stage
    plan = plan_lines(launch("--dry-run", "respond", "-w", "r", "-c", str(cfg),
                             env={"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7"}))
    assert [w["env"]["CUDA_VISIBLE_DEVICES"] for w in plan] == ["0,1,2,3", "4,5,6,7"]


NOHUP_LAUNCHER = r"""
import signal, sys
signal.signal(signal.SIGHUP, signal.SIG_IGN)  # as `nohup guidealign launch ...` starts it
from guidealign.launch import Worker, run_workers
w = Worker(rank=0, world_size=1, local_rank=0, gpus=[], argv=[sys.executable, "-c", sys.argv[1]])
print("status", run_workers([w], grace=60), flush=True)
"""


def test_a_launch_under_nohup_keeps_its_workers_through_a_hangup(tmp_path):
    """Forwarding SIGHUP must not undo nohup: launch started with SIGHUP ignored passed the
    hangup on and its workers died with the session."""
    import signal

    flag, go = tmp_path / "worker", tmp_path / "go"
    # the worker lives until the hangup was sent (``go``) and 2 s more, so a hangup that launch
    # passed on (its handler runs within milliseconds of the signal) reaches it and kills it
    # (status 129); with none passed on it exits 0 whenever it gets there
    worker = (f"import pathlib, sys, time; pathlib.Path({str(flag)!r}).write_text('up')\n"
              f"t = time.monotonic()\n"
              f"while not pathlib.Path({str(go)!r}).exists():\n"
              f"    if time.monotonic() - t > 50: sys.exit(3)\n"
              f"    time.sleep(0.05)\n"
              f"time.sleep(2)\n")
    out = _signal_once_started(NOHUP_LAUNCHER, worker, flag, signal.SIGHUP, after=go.touch)
    assert "status 0" in out
