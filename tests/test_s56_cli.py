"""s56, the command line as a user meets it: `show` when detect's shard is damaged (it said
detect had not run), `show --stage` naming no dataset (it said the stage had no committed shard
"of its current config yet"), a misspelt config key (the error listed every key but suggested
none), and `status --json` rows whose keys depended on the stage (``note``, ``yield``)."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest
from click.testing import CliRunner

from guidealign.cli import cli
from guidealign.config import ConfigError, load_config
from guidealign.shards import write_manifest, write_shard
from guidealign.shards.stage import shard_fingerprint
from synthetic import write_respond_shards


def _detect_shards(run, shards: int = 2, rows: int = 3, src=None) -> None:
    """A committed detect dataset whose shard i holds the ids write_respond_shards gives shard i."""
    det = run / "detect"
    write_manifest(det, stage="detect", num_shards=shards, fingerprint="d",
                   **({"input": str(src)} if src is not None else {}))
    for i in range(shards):
        write_shard(det, i, pa.table({"id": [f"p{i}-{k}" for k in range(rows)],
                                      "prompt": [f"question {i}-{k}" for k in range(rows)],
                                      "risky": [True] * rows, "rationale": ["r"] * rows,
                                      "parse_status": ["ok"] * rows, "finish_reason": ["stop"] * rows}),
                    f"d{i}" if src is None else shard_fingerprint("d", src, i))


def _damage(run, how: str) -> None:
    f = run / "detect" / "shard-00000.parquet"
    if how == "cut":
        f.write_bytes(f.read_bytes()[:100])
    else:
        f.unlink()  # its marker still there


def _show(*args) -> tuple[int, str]:
    r = CliRunner().invoke(cli, ["show", *map(str, args)])
    return r.exit_code, r.output


@pytest.mark.parametrize("how", ["cut", "missing"])
def test_show_says_a_damaged_detect_shard_is_damaged_not_that_detect_did_not_run(tmp_path, how):
    write_respond_shards(tmp_path, shards=2, rows=3)
    _detect_shards(tmp_path)
    code, out = _show(tmp_path, "-n", "1")
    assert code == 0 and "- detect: risky" in out, out
    _damage(tmp_path, how)
    code, out = _show(tmp_path, "-n", "1")
    assert code == 0, out
    line = next(ln for ln in out.splitlines() if ln.startswith("- detect:"))
    assert "not run" not in line, line
    assert "damaged" in line and "shard 0" in line, line
    assert f"guidealign verify {tmp_path} --repair" in line, line
    # shard 1 of detect is intact: its verdicts still show
    code, out = _show(tmp_path, "-n", "1", "--shard", "1")
    assert code == 0 and "- detect: risky" in out and "damaged" not in out, out


def _prompts(d, shards: int = 2) -> None:
    write_manifest(d, stage=d.name, num_shards=shards, fingerprint="p", files=[])
    for i in range(shards):
        write_shard(d, i, pa.table({"id": [f"{d.name}{i}"], "prompt": ["q"]}), f"p{i}")


@pytest.mark.parametrize("answered", ["prompts", "prompts-sft"])
def test_show_names_detect_damage_only_for_the_prompts_detect_labelled(tmp_path, answered):
    """Manifests that record their inputs, as the stages write them: detect <- prompts, respond
    <- retrieve <- ``answered``. Responses to another prompt set (the paper's inputs_sft) were
    never labelled by detect: for them its damaged shard is no reason, "not run" is."""
    for name in {"prompts", answered}:
        _prompts(tmp_path / name)
    _detect_shards(tmp_path, src=tmp_path / "prompts")
    retrieve = tmp_path / "retrieve"
    write_manifest(retrieve, stage="retrieve", num_shards=2, fingerprint="r", input=str(tmp_path / answered))
    for i in range(2):
        write_shard(retrieve, i, pa.table({"id": [f"p{i}-0"], "prompt": ["q"]}),
                    shard_fingerprint("r", tmp_path / answered, i))
    respond = tmp_path / "respond"
    write_manifest(respond, stage="respond", num_shards=2, fingerprint="a", input=str(retrieve))
    for i in range(2):
        write_shard(respond, i, pa.table({"id": [f"p{i}-{k}" for k in range(3)],
                                          "prompt": [f"question {i}-{k}" for k in range(3)],
                                          "response": [f"answer {i}-{k}" for k in range(3)]}),
                    shard_fingerprint("a", retrieve, i))
    _damage(tmp_path, "cut")
    code, out = _show(tmp_path, "-n", "1")
    assert code == 0, out
    line = next(ln for ln in out.splitlines() if ln.startswith("- detect:"))
    if answered == "prompts":
        assert "damaged" in line and f"guidealign verify {tmp_path} --repair" in line, line
    else:
        assert "not run on this prompt" in line, line


def test_show_of_a_stage_that_is_not_there_says_so_and_names_the_datasets(tmp_path):
    write_respond_shards(tmp_path)
    code, out = _show(tmp_path, "--stage", "respnd")
    assert code == 1, out
    assert "does not exist" in out and "current config" not in out, out
    assert "respond" in out.split("does not exist", 1)[1], out  # the dataset meant
    # eval/ holds one dataset per benchmark: show names them
    (tmp_path / "eval").mkdir()
    write_respond_shards(tmp_path / "scratch").rename(tmp_path / "eval" / "dna-b")
    (tmp_path / "scratch").rmdir()
    code, out = _show(tmp_path, "--stage", "eval")
    assert code == 1 and "eval/dna-b" in out and "current config" not in out, out
    code, out = _show(tmp_path, "--stage", "eval/dna-b", "-n", "1")
    assert code == 0 and "answer 0-0" in out, out


@pytest.mark.parametrize("override, meant", [
    ("detect.sampling.temprature=0", "detect.sampling.temperature"),
    ("eval.benchmarks=[x]", "eval.benchmark"),
    ("detcet.max_exemplars=2", "detect"),
    ("respond.engine.dtyp=float32", "respond.engine.dtype"),
    ("model=/m", "engine.model"),  # a section's key at the top level
])
def test_a_misspelt_config_key_suggests_the_key_meant(override, meant):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert f"did you mean {meant}" in str(e.value), str(e.value)


def test_a_misspelt_key_in_a_config_file_suggests_the_key_meant_on_the_command_line(tmp_path):
    (tmp_path / "c.yaml").write_text("engine:\n  dtpe: float32\n")
    r = CliRunner().invoke(cli, ["config", "show", "-c", str(tmp_path / "c.yaml")])
    assert r.exit_code == 2, r.output
    assert "did you mean engine.dtype" in r.output and "Traceback" not in r.output, r.output


def test_status_json_rows_have_the_same_keys_in_every_state(tmp_path):
    """A done respond, a detect with a damaged shard (a note), a manifest that does not read,
    an artifact being built: ``note`` and ``yield`` are in every row (null where none)."""
    write_respond_shards(tmp_path, shards=2, rows=3)
    _detect_shards(tmp_path)
    _damage(tmp_path, "cut")
    (tmp_path / "guidelines").mkdir()
    (tmp_path / "guidelines" / "_stage.json").write_text("{not json")
    (tmp_path / "index").mkdir()
    (tmp_path / "index" / "part").write_text("x")
    r = CliRunner().invoke(cli, ["status", "--json", str(tmp_path)])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert {row["stage"] for row in rows} == {"detect", "guidelines", "index", "respond"}, rows
    keys = {frozenset(row) for row in rows}
    assert len(keys) == 1, [sorted(row) for row in rows]
    assert {"note", "yield"} <= set(next(iter(keys))), keys
    by = {row["stage"]: row for row in rows}
    assert by["respond"]["note"] is None and "damaged" in by["detect"]["note"], rows


def test_export_of_a_damaged_input_shard_points_to_verify_not_to_waiting(tmp_path):
    """A respond shard whose file was cut short is no shard still to come: "finish the stage,
    then export again" sent the user to wait for a stage that had finished."""
    dst = write_respond_shards(tmp_path, shards=2, rows=3)
    f = dst / "shard-00000.parquet"
    f.write_bytes(f.read_bytes()[:100])
    r = CliRunner().invoke(cli, ["export", "-w", str(tmp_path), "--no-progress"])
    assert r.exit_code == 1, r.output
    err = r.output.strip().splitlines()[-1]
    assert "damaged" in err and "shard(s) 0 " in err, err
    assert f"guidealign verify {tmp_path} --repair" in err and "not committed yet" not in err, err


def _commands(cmd, path=()):
    import click

    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            yield from _commands(sub, (*path, name))
    else:
        yield " ".join(path), cmd


def test_every_command_and_option_says_what_it_does_in_its_help():
    import click

    bare = [f"{name} {'/'.join(p.opts)}" for name, cmd in _commands(cli) for p in cmd.params
            if isinstance(p, click.Option) and not p.hidden and not (p.help or "").strip()]
    bare += [name for name, cmd in _commands(cli) if not (cmd.help or "").strip()]
    assert not bare, f"no help text: {bare}"


def test_export_of_a_misspelt_dataset_names_the_datasets_there(tmp_path):
    write_respond_shards(tmp_path)
    r = CliRunner().invoke(cli, ["export", "respnd", "-w", str(tmp_path), "--no-progress"])
    assert r.exit_code == 1, r.output
    assert "does not exist" in r.output and "(the datasets there: respond)" in r.output, r.output
    assert not (tmp_path / "export").exists()


def test_a_key_given_twice_in_an_override_names_the_override_not_a_line():
    item = "executor.ray_resources={num_cpus: 1, num_cpus: 2}"
    with pytest.raises(ConfigError) as e:
        load_config(None, [item])
    assert f"override {item!r}" in str(e.value) and "twice" in str(e.value), str(e.value)


def test_the_same_run_directory_spelt_two_ways_is_one_not_two(tmp_path, monkeypatch):
    write_respond_shards(tmp_path / "w")
    monkeypatch.chdir(tmp_path)
    for arg, opt in (("w/", "w"), ("./w", "w"), (str(tmp_path / "w"), "w")):
        r = CliRunner().invoke(cli, ["status", arg, "-w", opt])
        assert r.exit_code == 0 and "respond" in r.output, (arg, opt, r.output)
    (tmp_path / "v").mkdir()
    r = CliRunner().invoke(cli, ["status", "v", "-w", "w"])
    assert r.exit_code == 2 and "two run directories" in r.output, r.output
