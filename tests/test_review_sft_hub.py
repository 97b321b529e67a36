"""Review of sft/ and hub/: resuming after a crash while a checkpoint was being saved, two
response datasets with the same directory name, and a retried delete commit (a folder delete)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest

from guidealign.config import load_config
from guidealign.gen.respond import RESPOND_SCHEMA
from guidealign.shards import write_manifest, write_shard

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "sft-tiny-cpu.yaml"


def _rows(tag: str, n: int = 2) -> list[dict]:
    return [dict(id=f"{tag}-{i}", prompt=f"question {tag} {i}", guideline_ids=["g"],
                 guideline_texts=["GUIDELINE"], response=f"answer {tag} {i}", finish_reason="stop",
                 model="m", prompt_tokens=1, output_tokens=1, note="") for i in range(n)]


def _write_stage(d: Path, rows: list[dict]) -> Path:
    write_manifest(d, stage="respond", num_shards=1, fingerprint="t")
    write_shard(d, 0, pa.Table.from_pylist(rows, schema=RESPOND_SCHEMA), "fp0")
    return d


# -- SFT resume: a checkpoint cut off while it was being written --------------------------------

def _what_the_trainer_resumes(ckpt_dir: Path, resume):
    """The checkpoint transformers' Trainer.train(resume_from_checkpoint=resume) loads."""
    from transformers.trainer_utils import get_last_checkpoint

    if resume is None or resume is False:
        return None
    return get_last_checkpoint(str(ckpt_dir)) if resume is True else resume


def test_resume_skips_a_checkpoint_cut_off_while_being_saved(workdir):
    """A run killed while saving checkpoint-4 (weights written, no trainer_state.json yet,
    which transformers writes last): every rerun resumed from checkpoint-4 and crashed on the
    missing trainer state; it must resume from the last complete one, checkpoint-2."""
    from guidealign.sft.checkpoints import checkpoint_dir, resume_point

    scfg = load_config(TINY, ["sft.save_steps=2"]).sft
    ck = checkpoint_dir(workdir, "fp")
    for step in (2, 4):
        (ck / f"checkpoint-{step}").mkdir(parents=True)
        (ck / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"weights")
    (ck / "checkpoint-2" / "trainer_state.json").write_text('{"global_step": 2}')
    chosen = _what_the_trainer_resumes(ck, resume_point(ck, scfg, main=True))
    assert chosen is not None and Path(chosen).name == "checkpoint-2"
    assert (Path(chosen) / "trainer_state.json").is_file()


def test_no_complete_checkpoint_starts_over(workdir):
    """Only a cut-off checkpoint: start from the base model (Trainer raised on it)."""
    from guidealign.sft.checkpoints import checkpoint_dir, resume_point

    scfg = load_config(TINY, ["sft.save_steps=2"]).sft
    ck = checkpoint_dir(workdir, "fp")
    (ck / "checkpoint-2").mkdir(parents=True)
    (ck / "checkpoint-2" / "model.safetensors").write_bytes(b"half")
    assert _what_the_trainer_resumes(ck, resume_point(ck, scfg, main=True)) is None


@pytest.mark.slow
def test_a_real_run_killed_while_saving_resumes_and_finishes(workdir, monkeypatch):
    """Real TRL steps: a run dies right after its step-2 checkpoint started (its trainer state
    never written); the rerun resumes from checkpoint-1 and finishes all 3 steps."""
    import guidealign.sft.train as train
    from transformers import TrainerCallback

    _write_stage(workdir / "respond", _rows("q", 4))
    cfg = load_config(TINY, ["sft.max_steps=3", "sft.save_steps=1", "sft.num_threads=1",
                             "sft.max_seq_length=64"])

    class Killed(Exception):
        pass

    class KillWhileSaving(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            if state.global_step == 2:
                ck = Path(args.output_dir) / "checkpoint-2"
                (ck / "trainer_state.json").unlink()  # as if killed before it was written
                raise Killed

    real = train.build_trainer
    kill = [True]

    def build(*a, **k):
        out = real(*a, **k)
        if kill[0]:
            out[0].add_callback(KillWhileSaving())
        return out

    monkeypatch.setattr(train, "build_trainer", build)
    with pytest.raises(Killed):
        train.run_sft(cfg, workdir, progress=False)
    kill[0] = False
    done = train.run_sft(cfg, workdir, progress=False)
    assert done["steps"] == 3 and len(done["losses"]) == 3


# -- SFT data: two response datasets with the same directory name ------------------------------

def test_two_datasets_with_one_directory_name_both_count(tmp_path, workdir):
    """sft.data: [/runs/a/respond, /runs/b/respond] (responses of two runs): both were keyed
    "respond" in the report, so one's checksums overwrote the other's: a change in run a's
    responses left the fingerprint as it was (a stale model reused), and the card listed one
    dataset."""
    from guidealign.sft.data import build_dataset
    from guidealign.sft.fingerprint import sft_fingerprint

    a = _write_stage(tmp_path / "a" / "respond", _rows("a"))
    b = _write_stage(tmp_path / "b" / "respond", _rows("b"))
    cfg = load_config(TINY, [f"sft.data=[{a},{b}]"])
    ds, rep = build_dataset(cfg.sft, workdir)
    assert len(ds) == 4 and len(rep.sources) == 2
    before = sft_fingerprint(cfg, rep)
    _write_stage(a, _rows("a-changed"))  # run a's responses change
    _, rep2 = build_dataset(cfg.sft, workdir)
    assert sft_fingerprint(cfg, rep2) != before


# -- push: a delete commit retried after it landed ---------------------------------------------

def _http_error(status: int):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    req = httpx2.Request("POST", "http://hub.invalid/api/models/org/m/commit/main")
    return HfHubHTTPError(f"HTTP {status}", response=httpx2.Response(status, request=req))


class _LostAnswerHub:
    """Applies the first commit, then loses its answer (HTTP 502); deleting a path (or folder)
    that is not there is a 404, as on the Hub ("A file with this name doesn't exist")."""

    def __init__(self, files):
        self.files = set(files)
        self.commits = 0
        self.sent = []

    def list_repo_files(self, repo_id, repo_type=None, revision=None):
        return sorted(self.files)

    def create_commit(self, repo_id, operations, commit_message, repo_type=None, revision=None):
        self.sent.append([(op.path_in_repo, op.is_folder) for op in operations])
        gone = set()
        for op in operations:
            hit = {p for p in self.files if p.startswith(op.path_in_repo)} if op.is_folder \
                else {op.path_in_repo} & self.files
            if not hit:
                raise _http_error(404)
            gone |= hit
        self.files -= gone
        self.commits += 1
        if self.commits == 1:
            raise _http_error(502)
        return SimpleNamespace(oid=f"c{self.commits}")

    def repo_info(self, repo_id, repo_type=None, revision=None):
        return SimpleNamespace(sha=f"c{self.commits}")


def test_a_retried_delete_commit_that_had_landed_does_not_fail_the_push():
    """The last commit of a dataset push deletes an earlier version's folder (one folder
    delete) and the flat shards of an older push; it lands, its answer is lost, and the retry
    finds nothing left: no second commit, no 404, counted once, the head looked up."""
    from guidealign.hub.commits import commit_step
    from guidealign.hub.push import PushReport, StaleFiles, count_commit, owned_by_push
    from guidealign.hub.targets import LocalFile

    old = ["data/aaaaaaaaaaaa/shard-00000.parquet", "data/aaaaaaaaaaaa/shard-00001.parquet"]
    hub = _LostAnswerHub({"README.md", "notes/x.txt", "data/bbbbbbbbbbbb/shard-00000.parquet",
                          "data/shard-00000.parquet", *old})
    pcfg = load_config(None, ["push.backoff_s=0", "push.backoff_max_s=0"]).push
    report = PushReport(repo_id="org/ds", repo_type="dataset")
    keep = [LocalFile("data/bbbbbbbbbbbb/shard-00000.parquet", Path("x"), 1),
            LocalFile("README.md", Path("y"), 1)]
    # the files to push are on the Hub already: the commit only deletes
    stale = StaleFiles(hub, keep, owned_by_push("dataset", "data"), repo_id="org/ds",
                       repo_type="dataset", revision="main")
    info, sent = commit_step(hub, [], repo_id="org/ds", repo_type="dataset", revision="main",
                             pcfg=pcfg, title="t", what="commit", stale=stale,
                             on_retry=report.count_retry)
    count_commit(report, sent, stale)
    assert info is None and hub.sent == [[("data/aaaaaaaaaaaa/", True),
                                          ("data/shard-00000.parquet", False)]]
    assert hub.files == {"README.md", "notes/x.txt", "data/bbbbbbbbbbbb/shard-00000.parquet"}
    assert report.retries == 1
    assert report.commits == hub.commits == 1
    assert report.deleted_paths == old + ["data/shard-00000.parquet"]


def test_stale_files_go_as_the_fewest_deletes():
    from guidealign.hub.push import stale_targets

    present = ["README.md", "data/v1/a.parquet", "data/v1/b.parquet", "data/v2/a.parquet",
               "data/v2/sub/c.parquet", "data/flat.parquet", "m/adapter.bin", "m/config.json"]
    gone = ["data/flat.parquet", "data/v2/a.parquet", "data/v2/sub/c.parquet", "m/adapter.bin"]
    assert stale_targets(gone, present) == {
        "data/flat.parquet": ["data/flat.parquet"],
        "data/v2/": ["data/v2/a.parquet", "data/v2/sub/c.parquet"],
        "m/adapter.bin": ["m/adapter.bin"]}


# -- SFT precision: float32 master weights under bf16 compute ------------------------------------

def test_full_fine_tuning_in_bf16_keeps_float32_master_weights_so_small_updates_land(workdir):
    """With sft.precision=bf16 the model was loaded in bf16 and AdamW updated the bf16 weights:
    an update under ~1/256 of a weight rounds away, so at an SFT learning rate one step left
    nearly every weight as it was. Loaded in float32 (the trainer's bf16 flag computes in bf16),
    the step moves them."""
    import torch

    from guidealign.sft.data import build_dataset
    from guidealign.sft.train import build_trainer

    _write_stage(workdir / "respond", _rows("q", 4))
    cfg = load_config(TINY, ["sft.precision=bf16", "sft.max_steps=1", "sft.learning_rate=5e-6",
                             "sft.max_seq_length=64", "sft.num_threads=1"])
    torch.set_num_threads(1)
    ds, _ = build_dataset(cfg.sft, workdir)
    trainer, *_ = build_trainer(cfg, workdir, ds, world=1, progress=False)
    assert trainer.args.bf16
    w = trainer.model.model.layers[0].mlp.down_proj.weight
    assert w.dtype == torch.float32
    before = w.detach().clone()
    trainer.train()
    moved = (w.detach() != before).float().mean().item()
    assert moved > 0.5, f"only {moved:.1%} of the weights moved in one step"


# -- SFT commit: the resume points go only after the model is committed -------------------------

def test_a_kill_while_the_finished_model_is_checksummed_keeps_the_checkpoints(workdir, monkeypatch):
    """The checkpoints were deleted before the finished model was checksummed (minutes for a 13B
    model) and _done.json written: a run killed in that window had neither, and trained again
    from the first step. Now the checkpoints go last, and a rerun after a kill resumes."""
    import guidealign.shards.artifact_files as files
    import guidealign.sft.train as train

    _write_stage(workdir / "respond", _rows("q", 2))
    cfg = load_config(TINY, ["sft.save_steps=1"])

    class Killed(BaseException):
        pass

    resumed = []

    def fake_build_trainer(cfg, wd, ds, *, world, progress, ckpt_dir=None):
        out = Path(ckpt_dir)

        class Accel:
            def wait_for_everyone(self):
                pass

            def unwrap_model(self, m):
                return m

        class Trainer:
            train_dataset = [None, None]
            accelerator = Accel()
            model = SimpleNamespace(generation_config=None)
            state = SimpleNamespace(log_history=[{"loss": 1.0, "step": 1}], global_step=1, epoch=1.0)

            def train(self, resume_from_checkpoint=None):
                resumed.append(resume_from_checkpoint)
                (out / "checkpoint-1").mkdir(parents=True, exist_ok=True)
                (out / "checkpoint-1" / "trainer_state.json").write_text('{"global_step": 1}')
                return SimpleNamespace(training_loss=1.0)

            def is_world_process_zero(self):
                return True

            def save_model(self, path):
                Path(path).mkdir(parents=True, exist_ok=True)
                (Path(path) / "model.safetensors").write_bytes(b"weights")

        tok = SimpleNamespace(save_pretrained=lambda p: (Path(p) / "tokenizer.json").write_text("{}"))
        return Trainer(), tok, 1, "float32"

    monkeypatch.setattr(train, "build_trainer", fake_build_trainer)
    real = files.file_checksums

    def killed_while_checksumming(*a, **k):
        raise Killed

    monkeypatch.setattr(files, "file_checksums", killed_while_checksumming)
    with pytest.raises(Killed):
        train._train(cfg, workdir, progress=False, force=False)
    ckpts = workdir / "sft" / "checkpoints"
    assert any(ckpts.rglob("checkpoint-1/trainer_state.json")), "the resume point was deleted"
    monkeypatch.setattr(files, "file_checksums", real)
    done = train._train(cfg, workdir, progress=False, force=False)
    assert resumed[0] is None and Path(resumed[1]).name == "checkpoint-1"
    assert not ckpts.exists() and "model/model.safetensors" in done["files"]
    assert not any(k.startswith("checkpoints/") for k in done["files"])


@pytest.mark.parametrize("tied", [False, True])
def test_lora_trains_the_rows_of_tokens_the_chat_template_added(tied):
    """A base model without the template's tokens (chatml on Llama-2) gets fresh embedding rows;
    LoRA alone never trains them, so the merged model could not read <|im_start|> or emit
    <|im_end|>. With the config sft builds, the new rows of the input embeddings and of the
    output head (untied, as Llama-2's) are trained and the old rows left as they were."""
    import torch
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from guidealign.config import load_config
    from guidealign.sft.train import lora_config

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         tie_word_embeddings=tied))
    model.resize_token_embeddings(102, mean_resizing=False)
    new = [100, 101]
    emb0 = model.get_input_embeddings().weight.detach().clone()
    head0 = model.get_output_embeddings().weight.detach().clone()
    pm = get_peft_model(model, lora_config(load_config(None, ["sft.mode=lora"]).sft, model, new))
    opt = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=1.0)
    x = torch.tensor([[1, 100, 5, 101, 7]])
    for _ in range(3):
        pm(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    merged = pm.merge_and_unload()
    emb, head = merged.get_input_embeddings().weight, merged.get_output_embeddings().weight
    assert not torch.equal(emb[new], emb0[new]), "the added tokens' input embeddings were not trained"
    assert not torch.equal(head[new], head0[new]), "the added tokens' output rows were not trained"
    assert torch.equal(emb[:100], emb0[:100]) and torch.equal(head[:100], head0[:100])
    assert (emb.data_ptr() == head.data_ptr()) == tied


def test_sft_fingerprint_ignores_speed_memory_and_logging_settings():
    """Every sft key counted: turning on gradient checkpointing or a smaller micro-batch after
    running out of memory (the global batch stays), or another save/logging interval, deleted
    the run's checkpoints and trained from step 0, and retrained a finished model."""
    from types import SimpleNamespace

    from guidealign.config import load_config
    from guidealign.sft.fingerprint import sft_fingerprint

    rep = SimpleNamespace(sources={"respond": ["sha"]})
    base = sft_fingerprint(load_config(None), rep)
    for k, v in (("gradient_checkpointing", "true"), ("micro_batch_size", "1"), ("logging_steps", "7"),
                 ("save_steps", "9")):
        assert sft_fingerprint(load_config(None, [f"sft.{k}={v}"]), rep) == base, k
    for k, v in (("learning_rate", "3e-5"), ("global_batch_size", "8"), ("epochs", "2")):
        assert sft_fingerprint(load_config(None, [f"sft.{k}={v}"]), rep) != base, k


def test_a_lora_merge_under_fsdp_or_deepspeed_is_refused_before_training(monkeypatch):
    """The merge ran on one process over weights still sharded: a hang, or broken weights, at
    the end of the whole training run. Refused up front; the accelerate config's environment
    counts as sharded too (and loads the model in half precision, not float32 per process)."""
    import pytest
    import torch

    from guidealign.config import load_config
    from guidealign.sft.precision import check_lora_merge, load_dtype

    for k in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.delenv(k, raising=False)
    lora = ["sft.mode=lora", "sft.merge_lora=true"]
    check_lora_merge(load_config(None, lora).sft)  # no sharding: fine
    with pytest.raises(ValueError, match="merge_lora with FSDP/DeepSpeed"):
        check_lora_merge(load_config(None, lora + ['sft.trainer_args={"fsdp": "full_shard auto_wrap"}']).sft)
    check_lora_merge(load_config(None, ["sft.mode=lora", "sft.merge_lora=false",
                                        'sft.trainer_args={"fsdp": "full_shard"}']).sft)
    check_lora_merge(load_config(None, ['sft.trainer_args={"fsdp": "full_shard"}']).sft)  # full mode
    assert load_dtype("full", torch.bfloat16, {}) == torch.float32
    # FSDP: accelerate makes every trainable weight float32 on each process before sharding,
    # so a bf16 load only rounded the checkpoint first
    assert load_dtype("full", torch.bfloat16, {"fsdp": "full_shard auto_wrap"}) == torch.float32
    assert load_dtype("lora", torch.bfloat16, {"fsdp": "full_shard auto_wrap"}) == torch.bfloat16
    # FSDP 1 shards first and makes float32 copies of the shards after: half precision, as before
    assert load_dtype("full", torch.bfloat16, {"fsdp": "full_shard", "fsdp_config": {"version": 1}}) == torch.bfloat16
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # an accelerate config: FSDP 1 unless it says 2
    assert load_dtype("full", torch.bfloat16, {}) == torch.bfloat16
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert load_dtype("full", torch.bfloat16, {}) == torch.float32
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.delenv("FSDP_VERSION")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ValueError, match="merge_lora with FSDP/DeepSpeed"):
        check_lora_merge(load_config(None, lora).sft)
    assert load_dtype("full", torch.bfloat16, {}) == torch.bfloat16


def test_a_single_process_sft_trains_on_one_device_and_waits_long_at_barriers(workdir, monkeypatch):
    """One SFT process seeing several GPUs (sft.num_processes: 1) failed before training: TRL's
    SFTTrainer refuses the DataParallel that Trainer sets up there (found in review; the
    retriever already kept to one device). The settled device count (_n_gpu, which transformers
    sets from torch.cuda.device_count()) is now cut to one first; here a stand-in makes it 4, as
    on a 4-GPU node. Also: the barrier timeout covers writing a 13B model (NCCL's default 30
    minutes did not)."""
    import transformers

    from guidealign.sft.data import build_dataset
    from guidealign.sft.train import build_trainer

    real = transformers.TrainingArguments._setup_devices  # a cached_property: settled once

    def four_gpus(self):
        if "_four" not in self.__dict__:
            self.__dict__["_four"] = real.__get__(self)
            self._n_gpu = 4
        return self.__dict__["_four"]

    monkeypatch.setattr(transformers.TrainingArguments, "_setup_devices", property(four_gpus))
    _write_stage(workdir / "respond", _rows("q", 4))
    cfg = load_config(TINY, ["sft.max_steps=1", "sft.max_seq_length=64", "sft.num_threads=1"])
    ds, _ = build_dataset(cfg.sft, workdir)
    trainer, *_ = build_trainer(cfg, workdir, ds, world=1, progress=False)
    assert trainer.args.n_gpu == 1
    assert trainer.args.train_batch_size == cfg.sft.micro_batch_size
    assert trainer.args.ddp_timeout >= 4 * 3600


def test_a_model_saved_without_weights_is_not_committed(workdir, monkeypatch):
    """Under DeepSpeed ZeRO-3 without gathered 16-bit weights (and, before the final save switched
    FSDP to the full type, under FSDP's SHARDED_STATE_DICT) Trainer.save_model writes no full weights: sft/model was committed with a tokenizer and a
    card but nothing to load (found in review). A save without weight files now stops before
    anything is committed; here a stand-in save writes only the config."""
    from guidealign.sft import train

    real = train.build_trainer

    def build(*a, **k):
        out = real(*a, **k)
        out[0].save_model = lambda path: out[0].model.config.save_pretrained(path)
        return out

    monkeypatch.setattr(train, "build_trainer", build)
    _write_stage(workdir / "respond", _rows("q", 4))
    cfg = load_config(TINY, ["sft.max_steps=1", "sft.max_seq_length=64", "sft.num_threads=1"])
    with pytest.raises(RuntimeError, match="saved no model weights"):
        train.run_sft(cfg, workdir, progress=False)
    assert not (workdir / "sft" / "_done.json").exists() and not (workdir / "sft" / "model").exists()
