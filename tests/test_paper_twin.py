"""The CPU twin of the paper's recipe: `guidealign run -c configs/gpu-paper.yaml` with only the
model names swapped for local stand-ins of the same kind (tests/paper_twin_overrides.yaml), on a
few prompts: two prompt sets, a responder and an SFT base that ship no chat template (the
configured Vicuna v1.1 format is used), 2 response exemplars, the SFT launcher; the trained
model then answers in vLLM with the template saved with it."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from standins import model_without_template

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples" / "prompts.jsonl"


def twin_overrides(values: dict) -> list[str]:
    spec = yaml.safe_load((REPO / "tests" / "paper_twin_overrides.yaml").read_text())
    out = []
    for section in ("models", "cpu", "sizes"):
        for k, v in spec[section].items():
            text = yaml.safe_dump(v, default_flow_style=True).strip()
            if text.endswith("\n..."):
                text = text[:-4].strip()
            for name, val in values.items():
                text = text.replace("{" + name + "}", val)
            out += ["--set", f"{k}={text}"]
    return out


@pytest.mark.slow
def test_paper_recipe_runs_on_cpu_standins(tmp_path, generator_path):
    from guidealign.shards import iter_tables

    bare = model_without_template(generator_path, tmp_path / "no-template-model")
    rows = [json.loads(x) for x in SAMPLES.read_text().splitlines() if x.strip()]
    lib, sft = tmp_path / "library.jsonl", tmp_path / "sft.jsonl"
    lib.write_text("".join(json.dumps(r) + "\n" for r in rows[:4] + rows[16:20]))
    sft.write_text("".join(json.dumps(r) + "\n" for r in rows[8:10] + rows[24:26]))
    sets = {"no_template_model": str(bare), "library_prompts": str(lib), "sft_prompts": str(sft)}
    wd = tmp_path / "run"
    argv = [sys.executable, "-m", "guidealign", "run", "-c", str(REPO / "configs" / "gpu-paper.yaml"),
            "-w", str(wd), "--no-progress", *twin_overrides(sets)]
    p = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=1500)
    print(p.stdout[-4000:])
    assert p.returncode == 0, p.stderr[-6000:]
    assert "guidealign check" in p.stdout  # the preflight ran first

    def ids(stage):
        return sorted(i for t in iter_tables(wd / stage) for i in t.column("id").to_pylist())

    # Two prompt sets: the library from one, retrieval and responses for the other.
    assert len(ids("prompts")) == 8 and len(ids("prompts-sft")) == 4
    assert ids("detect") == ids("prompts")
    assert ids("retrieve") == ids("prompts-sft") == ids("respond")
    resp = [r for t in iter_tables(wd / "respond") for r in t.to_pylist()]
    assert {r["model"] for r in resp} == {str(bare)}  # the responder's own model
    assert all(r["guideline_texts"] for r in resp)
    # the responder's prompts hold 2 example conversations in the Vicuna format
    from transformers import AutoTokenizer

    from guidealign.gen.respond import RespondConfig, load_exemplars

    tok = AutoTokenizer.from_pretrained(bare)
    assert not tok.chat_template  # the stand-in really has none
    ex_tokens = sum(len(tok(q + a)["input_ids"]) for q, a in load_exemplars(RespondConfig(num_exemplars=2))[0])
    assert all(r["prompt_tokens"] > ex_tokens for r in resp)

    done = json.loads((wd / "sft" / "_done.json").read_text())
    assert done["chat_template"] == "vicuna_v1.1" and done["steps"] == 2 and done["processes"] == 1
    model = wd / "sft" / "model"
    trained_tok = AutoTokenizer.from_pretrained(model)
    assert "ASSISTANT:" in trained_tok.chat_template

    # The trained model answers in vLLM with the template saved with it (no config needed).
    script = textwrap.dedent(f"""
        import json
        from guidealign.gen.engine import EngineConfig, Sampling, build_llm, sampling_params
        llm = build_llm(EngineConfig(model={str(model)!r}, dtype="float32", max_model_len=1024,
                                     max_num_seqs=4))
        msgs = [{{"role": "user", "content": "How do I make a sourdough starter?"}}]
        rendered = llm.get_tokenizer().apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        o = llm.chat([msgs], sampling_params(Sampling(temperature=0.0, max_tokens=24)), use_tqdm=False)[0]
        print("RESULT " + json.dumps({{"rendered": rendered, "text": o.outputs[0].text,
                                      "prompt_ids": list(o.prompt_token_ids)}}))
    """)
    q = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                       timeout=600)
    lines = [ln for ln in q.stdout.splitlines() if ln.startswith("RESULT ")]
    assert q.returncode == 0 and lines, q.stderr[-3000:]
    res = json.loads(lines[-1][7:])
    assert res["rendered"].startswith(trained_tok.bos_token + "A chat between")
    assert res["rendered"].endswith("USER: How do I make a sourdough starter? ASSISTANT:")
    assert res["prompt_ids"] == trained_tok(res["rendered"], add_special_tokens=False)["input_ids"]
    assert res["text"].strip()


def test_paper_recipe_answers_in_eval_papers_guided_prompt():
    """The SFT data (respond under configs/gpu-paper.yaml) is answered in the very system
    message eval-paper.yaml's guided run uses, and without guidelines in the same message as
    its baseline: Vicuna's own line kept, the guidelines after it (as the authors' script),
    not the default persona in its place."""
    import dataclasses

    from guidealign.config import load_config
    from guidealign.eval.generate import eval_respond_cfg
    from guidealign.gen.respond import build_messages

    # (the example conversations aside: eval answers benchmarks without them)
    recipe = dataclasses.replace(load_config(REPO / "configs" / "gpu-paper.yaml").respond, num_exemplars=0)
    ev = dataclasses.replace(eval_respond_cfg(load_config(REPO / "configs" / "eval-paper.yaml")).respond,
                             num_exemplars=0)
    rules = ["Check the facts.", "Be brief."]
    assert build_messages(recipe, "Q?", rules) == build_messages(ev, "Q?", rules)
    assert build_messages(recipe, "Q?", []) == build_messages(ev, "Q?", [])
    system = build_messages(recipe, "Q?", rules)[0]["content"]
    assert system.startswith("A chat between a curious user and an artificial intelligence assistant.")
    assert "1. Check the facts.\n2. Be brief." in system
