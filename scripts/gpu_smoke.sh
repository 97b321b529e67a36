#!/usr/bin/env bash
# Smoke run of guide-align's GPU path (everything but the vLLM engine) on one GPU node with no
# hub access, on tiny random models: preflight, launch's plan, the encoder stages (library with
# model candidates, train-retriever, index, retrieve) and SFT (full, bf16) through
# `launch run` on the node's GPUs, a rerun that must redo nothing, LoRA SFT of a Llama-2-like
# base that lacks the chat template's tokens, and GPU-vs-CPU checks of the encoder, the
# harmfulness classifier and the trained model. It shows mechanics (devices, dtypes,
# processes, resume), not quality.
#
#   python scripts/tiny_models.py MODELS            # once, where the embedded models are
#   scripts/gpu_smoke.sh MODELS RUN OUT
#
# RUN: a finished run's directory with prompts/, guidelines/ and respond/ (e.g. the demo's,
# through respond); it is copied, not changed. OUT gets one log per step and summary.txt
# (one line a step: rc and seconds). PYTHON (default python3) runs guidealign, which must be
# importable (installed, or on PYTHONPATH). Exits 1 when a step failed (check-paper excepted:
# the paper's models are not on a smoke node), 2 on bad arguments.
set -u
if [ $# -ne 3 ] || [ ! -d "$1" ] || [ ! -d "$2" ]; then
  echo "usage: $0 MODELS RUN OUT (MODELS and RUN: existing directories)" >&2
  exit 2
fi
MODELS=$(realpath "$1"); SRC=$(realpath "$2"); OUT=$(realpath -m "$3")
FAILED=()
cd "$(dirname "$0")/.."  # the repository root (configs/gpu-paper.yaml)
PY=${PYTHON:-python3}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
: > "$OUT/summary.txt"
W=$(mktemp -d)/run

step() {  # step NAME CMD...: its output to OUT/NAME.log, its rc and time to summary.txt
  local name=$1 t0=$SECONDS rc
  shift
  echo "== $name: $*"
  timeout -k 10 "$STEP_TIMEOUT" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  grep -q Traceback "$OUT/$name.log" && rc="$rc traceback"
  echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
  [ "$rc" = 0 ] || [ "$name" = check-paper ] || FAILED+=("$name")
  tail -n 15 "$OUT/$name.log"
}

step env bash -c "set -e; nvidia-smi; $PY - <<'EOF'
import importlib, sys
print(sys.version)
for m in ('torch', 'transformers', 'sentence_transformers', 'trl', 'datasets', 'peft', 'accelerate',
          'faiss', 'pyarrow', 'rapidfuzz'):
    try:
        print(m, importlib.import_module(m).__version__)
    except Exception as e:
        print(m, 'MISSING', e)
import torch
print('cuda', torch.cuda.is_available(), torch.cuda.device_count(),
      torch.cuda.get_device_name() if torch.cuda.is_available() else '')
EOF"

# the run to continue: prompts, guidelines and respond of SRC (the stages the smoke runs are redone)
mkdir -p "$W"
for d in prompts detect guidelines respond; do
  [ -d "$SRC/$d" ] && cp -r "$SRC/$d" "$W/"
done
cat > "$OUT/smoke.yaml" <<EOF
# written by scripts/gpu_smoke.sh; the engine and judge models are named for guidealign check only
engine: {model: $MODELS/llm-chat, max_model_len: 4096}
eval: {judge_model: $MODELS/llm-chat}
library: {candidates: model, embed_model: $MODELS/encoder, heldout_fraction: 0.25}
retriever: {base_model: $MODELS/encoder, epochs: 1, batch_size: 16}
sft: {base_model: $MODELS/llm-chat, mode: full, max_steps: 4, global_batch_size: 4, micro_batch_size: 2,
      max_seq_length: 2048, learning_rate: 1.0e-4, lr_scheduler: constant, warmup_ratio: 0.0}
EOF
C=$OUT/smoke.yaml
STAGES=library,train-retriever,index,retrieve,sft

step check-smoke $PY -m guidealign check -c "$C" -w "$W"
step check-paper $PY -m guidealign check -c configs/gpu-paper.yaml -w "$W"
step launch-plan $PY -m guidealign launch --dry-run run -c "$C" -w "$W" --stages "$STAGES"
step run $PY -m guidealign launch --log-dir "$OUT/ranks" run -c "$C" -w "$W" --stages "$STAGES"
for f in "$OUT"/ranks/*.log; do [ -f "$f" ] && tail -n 40 "$f"; done
step rerun $PY -m guidealign launch run -c "$C" -w "$W" --stages "$STAGES"
step status $PY -m guidealign status "$W"

# LoRA on a Llama-2-like base: chatml's tokens are added and trained (peft trainable tokens)
W2=$(dirname "$W")/lora
mkdir -p "$W2" && cp -r "$W/respond" "$W2/"
step sft-lora $PY -m guidealign sft -c "$C" -w "$W2" --set sft.base_model="$MODELS/llm-base" \
  --set sft.mode=lora --set sft.chat_template=chatml --set sft.max_seq_length=4096

step checks $PY - "$MODELS" "$W" "$W2" <<'EOF'
"""GPU vs CPU: the encoder's embeddings, the classifier's probabilities, the trained models'
next-token logits (bf16 on the GPU, so a tolerance)."""
import sys
import numpy as np
import torch
from guidealign.config import load_config
from guidealign.core.gpu import torch_device
from guidealign.retrieval.embed import encode, load_encoder

models, run, lora = sys.argv[1:]
dev = torch_device()
print("torch_device:", dev)
from guidealign.core import gpu
gpus = gpu.visible_gpus()
print("visible", gpus, "memory", gpu.gpu_memory() if gpus else {}, "exclusive", gpu.exclusive_gpus(gpus))
gpu.require_usable_gpus()
print("busy after 5 s wait:", gpu.wait_gpus_free(gpus, timeout_s=5) if gpus else None)
texts = [f"How do I keep a sourdough starter alive, case {i}?" for i in range(64)]
cpu = encode(load_encoder(f"{models}/encoder", device="cpu"), texts)
on_dev = encode(load_encoder(f"{models}/encoder", device=dev), texts)
cos = (cpu * on_dev).sum(1)
print(f"encoder {dev} vs cpu: min cosine {cos.min():.6f}")
assert cos.min() > 0.999, cos.min()
trained = encode(load_encoder(f"{run}/retriever/model", device=dev), texts)
print("trained retriever on", dev, trained.shape)

from guidealign.eval.classifier import HarmClassifier
ecfg = load_config(None, [f"eval.classifier_model={models}/classifier", "eval.classifier_device=cpu"]).eval
p_cpu = [p for _, p in HarmClassifier(ecfg).classify(texts[:8])]
ecfg.classifier_device = "auto"
clf = HarmClassifier(ecfg)
p_gpu = [p for _, p in clf.classify(texts[:8])]
print("classifier on", clf.device, "max |dp|", float(np.abs(np.subtract(p_cpu, p_gpu)).max()))
assert np.allclose(p_cpu, p_gpu, atol=1e-3)

from transformers import AutoModelForCausalLM, AutoTokenizer
for name in (f"{run}/sft/model", f"{lora}/sft/model"):
    tok = AutoTokenizer.from_pretrained(name)
    text = tok.apply_chat_template([{"role": "user", "content": "Hello?"}], tokenize=False,
                                   add_generation_prompt=True)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    m = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    ref = m(ids).logits[0, -1]
    m = m.to(dev, torch.bfloat16)
    out = m(ids.to(dev)).logits[0, -1].float().cpu()
    print(name, "eos", tok.eos_token, "dtype saved", m.config.dtype, "max |dlogit| bf16 vs fp32",
          float((out - ref).abs().max()))
    g = m.generate(ids.to(dev), max_new_tokens=8, do_sample=False)
    print("  generates", g.shape[1] - ids.shape[1], "tokens on", dev)
print("checks ok")
EOF
rm -rf "$(dirname "$W")"
echo "== summary"; cat "$OUT/summary.txt"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "failed: ${FAILED[*]}" >&2
  exit 1
fi
