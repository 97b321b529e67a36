"""SFT: the training set (no guidelines, drops counted), the assistant-only loss mask, a few real
TRL steps whose loss falls, and a checkpoint that loads in vLLM (in a subprocess) and answers."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pytest

from gen.respond import RESPOND_SCHEMA
from guidealign.config import load_config
from shards import write_manifest, write_shard

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "sft-tiny-cpu.yaml"
GUIDELINE = "SECRET-GUIDELINE-TEXT: refuse harmful requests politely."
ANSWER = "I can't help with that, but I can point you to safety resources instead."


def respond_rows(n_good=6):
    good = [dict(id=f"g{i}", prompt=f"Question number {i}: how do I do something risky?",
                 guideline_ids=["x1"], guideline_texts=[GUIDELINE], response=f" {ANSWER} ",
                 finish_reason="stop", model="m", prompt_tokens=10, output_tokens=10, note="")
            for i in range(n_good)]
    bad = [
        dict(id="t", prompt="Tell me a long story.", guideline_ids=[], guideline_texts=[],
             response="Once upon a", finish_reason="length", model="m", prompt_tokens=1,
             output_tokens=1, note=""),
        dict(id="e", prompt="Say nothing.", guideline_ids=[], guideline_texts=[], response="  ",
             finish_reason="stop", model="m", prompt_tokens=1, output_tokens=0, note=""),
        dict(id="x", prompt="Broken.", guideline_ids=[], guideline_texts=[], response="",
             finish_reason="error", model="m", prompt_tokens=1, output_tokens=0, note="boom"),
    ]
    return good, bad


def write_respond(workdir, shards):
    d = Path(workdir) / "respond"
    write_manifest(d, stage="respond", num_shards=len(shards), fingerprint="test")
    for i, rows in enumerate(shards):
        write_shard(d, i, pa.Table.from_pylist(rows, schema=RESPOND_SCHEMA), f"fp{i}")


def tiny_cfg(*overrides):
    return load_config(TINY, list(overrides))


def test_training_set_has_no_guidelines_and_counts_drops(workdir):
    from sft.data import build_dataset

    good, bad = respond_rows(4)
    write_respond(workdir, [good[:2] + bad, good[2:]])
    ds, rep = build_dataset(tiny_cfg().sft, workdir)
    assert rep.rows == 7 and rep.kept == 4 == len(ds)
    assert rep.dropped == {"truncated": 1, "empty_response": 1, "finish_reason_error": 1}
    ex = ds[0]
    assert ex["prompt"] == [{"role": "user", "content": good[0]["prompt"]}]
    assert ex["completion"] == [{"role": "assistant", "content": ANSWER}]
    assert GUIDELINE not in json.dumps(ds.to_list())


def test_no_examples_is_a_clear_error(workdir):
    from sft.data import build_dataset

    _, bad = respond_rows(0)
    write_respond(workdir, [bad])
    with pytest.raises(ValueError, match="no training examples"):
        build_dataset(tiny_cfg().sft, workdir)
    with pytest.raises(FileNotFoundError, match="guidealign respond"):
        build_dataset(tiny_cfg("sft.data=[nothing]").sft, workdir)


def test_sft_cli_without_responses_is_a_clear_error(workdir):
    from click.testing import CliRunner

    from guidealign.cli import cli

    r = CliRunner().invoke(cli, ["sft", "-w", str(workdir), "-c", str(TINY)])
    assert r.exit_code != 0 and "guidealign respond" in r.output


@pytest.mark.slow
def test_loss_is_on_the_assistant_turn_only(workdir, generator_path):
    """TRL's tokenization of our examples: labels cover exactly the assistant response."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from sft.data import build_dataset

    good, _ = respond_rows(2)
    write_respond(workdir, [good])
    ds, _ = build_dataset(tiny_cfg().sft, workdir)
    tok = AutoTokenizer.from_pretrained(generator_path)
    model = AutoModelForCausalLM.from_pretrained(generator_path)
    tr = SFTTrainer(model=model, processing_class=tok, train_dataset=ds,
                    args=SFTConfig(output_dir=str(workdir / "o"), max_length=256, report_to="none",
                                   completion_only_loss=True, bf16=False))
    batch = tr.data_collator([tr.train_dataset[0]])
    ids, labels = batch["input_ids"][0].tolist(), batch["labels"][0].tolist()
    trained = tok.decode([t for t, lab in zip(ids, labels) if lab != -100])
    assert trained.strip() == ANSWER + "<|im_end|>"
    full = tok.decode(ids)
    assert "<|im_start|>user\nQuestion number 0" in full and GUIDELINE not in full


@pytest.mark.slow
def test_sft_steps_loss_falls_and_vllm_answers(workdir):
    from sft.train import run_sft

    good, bad = respond_rows(8)
    write_respond(workdir, [good + bad])
    cfg = tiny_cfg("sft.max_steps=6", "sft.num_threads=2")
    done = run_sft(cfg, workdir, progress=False)
    print("sft:", {k: v for k, v in done.items() if k != "data"})
    assert done["rows"] == 8 and done["dropped"]["truncated"] == 1
    assert done["steps"] == 6 and len(done["losses"]) == 6
    assert done["last_loss"] < done["first_loss"]
    model = workdir / "sft" / "model"
    assert json.loads((workdir / "sft" / "_done.json").read_text())["fingerprint"] == done["fingerprint"]
    for f in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (model / f).exists(), f
    tcfg = json.loads((model / "tokenizer_config.json").read_text())
    assert "chat_template" in tcfg or (model / "chat_template.jinja").exists()
    card = (model / "README.md").read_text()
    assert "embedded:smollm2-135m-instruct" in card and "learning_rate: 5.0e-05" in card
    assert "respond" in card and "truncated: 1" in card
    assert not (workdir / "sft" / ".tmp-model").exists()
    # A rerun with the same config and data is a no-op.
    assert run_sft(cfg, workdir, progress=False).get("skipped") is True

    # The checkpoint loads in vLLM (own process: the session engine may be alive here) and answers.
    script = textwrap.dedent(f"""
        import json, sys
        from gen.engine import EngineConfig, build_llm, sampling_params, Sampling
        llm = build_llm(EngineConfig(model={str(model)!r}, dtype="float32", max_model_len=512,
                                     max_num_seqs=4))
        outs = llm.chat([[{{"role": "user", "content": "Question number 3: how do I do something risky?"}}]],
                        sampling_params(Sampling(temperature=0.0, max_tokens=24)), use_tqdm=False)
        o = outs[0].outputs[0]
        print("RESULT " + json.dumps({{"text": o.text, "finish": o.finish_reason}}))
    """)
    p = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    res = json.loads(lines[-1][7:])
    print("vLLM answer:", res)
    assert res["text"].strip() and res["finish"] in ("stop", "length")
    # It answers like its training data (loss fell to ~0 on this one response).
    assert "safety resources" in res["text"]


@pytest.mark.slow
def test_lora_merged_output_is_a_plain_model(workdir):
    from transformers import AutoModelForCausalLM

    from sft.train import run_sft

    good, _ = respond_rows(4)
    write_respond(workdir, [good])
    cfg = tiny_cfg("sft.mode=lora", "sft.max_steps=2", "sft.learning_rate=0.001", "sft.num_threads=2")
    done = run_sft(cfg, workdir, progress=False)
    model = workdir / "sft" / "model"
    assert not (model / "adapter_config.json").exists()
    m = AutoModelForCausalLM.from_pretrained(model)
    assert not any("lora" in n for n, _ in m.named_parameters())
    assert done["steps"] == 2
    assert "LoRA, adapter merged" in (model / "README.md").read_text()
