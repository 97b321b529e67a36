"""Host memory of loading SFT's base model in each of two training processes under FSDP with
``fsdp_config.cpu_ram_efficient_loading`` (the 13B recipe's setting): transformers' own
``from_pretrained`` against ``guidealign.sft.layout.load_base_model``.

    .venv/bin/python bench/sft_load_memory.py                  # the embedded SmolLM2-135M
    .venv/bin/python bench/sft_load_memory.py --model PATH

Starts ``torchrun --nproc_per_node 2`` (gloo, CPU) twice, once a way; each process sets what
``load_on_first_process_only`` sets, loads the model in float32 (what a full fine-tune under
FSDP 2 loads) and prints how much its RSS grew, beside the model's float32 size. With
transformers 5.19's loading the second process reads the whole checkpoint and keeps a
zero-filled copy (RSS grows by about the model's size); ``load_base_model`` builds it there
without reading the checkpoint (uninitialized parameters, whose pages are never touched until
FSDP fills them with the first process's weights). The first process's growth is small in both:
safetensors are memory-mapped, and a float32 checkpoint is used as mapped.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

WORKER = r"""
import gc, os, sys
import psutil, torch, torch.distributed as dist
dist.init_process_group("gloo")
os.environ["ACCELERATE_USE_FSDP"] = "true"
os.environ["FSDP_CPU_RAM_EFFICIENT_LOADING"] = "true"
from transformers import AutoModelForCausalLM
from guidealign.sft.layout import load_base_model
gc.collect()
proc = psutil.Process()
before = proc.memory_info().rss
if sys.argv[2] == "ours":
    model = load_base_model(sys.argv[1], torch.float32, True)
else:
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
gc.collect()
grew = (proc.memory_info().rss - before) / 2**20
size = sum(p.numel() for p in model.parameters()) * 4 / 2**20
print(f"RESULT {sys.argv[2]} local rank {os.environ['LOCAL_RANK']}: RSS +{grew:.0f} MiB "
      f"(float32 parameters {size:.0f} MiB)", flush=True)
dist.destroy_process_group()
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="a local model directory (default: the embedded generator)")
    a = ap.parse_args()
    model = a.model
    if model is None:
        from guidealign.core.models import prepare_generator

        model = str(prepare_generator())
    with tempfile.TemporaryDirectory() as d:
        script = Path(d) / "load_worker.py"
        script.write_text(WORKER)
        env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
        for way in ("transformers", "ours"):
            p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                "--nproc_per_node", "2", str(script), model, way],
                               capture_output=True, text=True, env=env, timeout=900)
            lines = sorted(ln[7:] for ln in p.stdout.splitlines() if ln.startswith("RESULT "))
            if p.returncode or len(lines) != 2:
                sys.exit(f"{way}: torchrun failed (status {p.returncode}):\n{p.stderr[-3000:]}")
            label = "transformers from_pretrained" if way == "transformers" else "load_base_model"
            for ln in lines:
                print(f"{label:30s} {ln.split(': ', 1)[0].removeprefix(way).strip():14s} {ln.split(': ', 1)[1]}")


if __name__ == "__main__":
    main()
