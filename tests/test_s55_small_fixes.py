"""Stop 55, small fixes from a review of the README against what the commands do:
``ingest --into export`` made the folder that holds the run's exports a prompt dataset."""
from __future__ import annotations

import json

from click.testing import CliRunner

from guidealign.cli import cli


def test_ingest_into_the_folder_of_the_runs_exports_is_refused(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"question {k}"}) + "\n" for k in range(3)))
    run = tmp_path / "run"
    for args in (["ingest", str(f)], ["export", "prompts"]):
        r = CliRunner().invoke(cli, [*args, "-w", str(run), "--no-progress"])
        assert r.exit_code == 0, r.output
    before = sorted(p.relative_to(run).as_posix() for p in (run / "export").rglob("*"))
    r = CliRunner().invoke(cli, ["ingest", str(f), "-w", str(run), "--into", "export", "--no-progress"])
    assert r.exit_code != 0
    assert "holds other datasets (prompts), not prompts" in r.output, r.output
    assert sorted(p.relative_to(run).as_posix() for p in (run / "export").rglob("*")) == before
    # a new name, or the run's own prompt set, is still taken
    r = CliRunner().invoke(cli, ["ingest", str(f), "-w", str(run), "--into", "more", "--no-progress"])
    assert r.exit_code == 0, r.output
