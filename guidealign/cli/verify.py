"""``guidealign verify WORKDIR``: re-checksum a run directory against its commit records."""
from __future__ import annotations

import json

import click

from guidealign.cli.options import run_directory

_STYLE = {"corrupt": "bold red", "missing": "bold red", "orphan": "yellow", "pending": "cyan",
          "note": "dim"}


def _cells(d) -> tuple[str, str]:
    total = d.shards_total if d.shards_total is not None else d.shards_committed
    shards = f"{d.shards_ok}/{total}" if d.kind not in ("artifact", "folder") else "-"
    files = f"{d.files_ok}/{d.files_listed}" if d.files_listed is not None else \
        ("-" if d.kind in ("dataset", "folder") else "unchecked")
    return shards, files


def _render_plain(rep) -> str:
    lines = [f"{'directory':<28} {'kind':<17} {'shards ok':>12} {'files ok':>10} {'problems':>8}"]
    for d in rep.dirs:
        shards, files = _cells(d)
        lines.append(f"{d.path:<28} {d.kind:<17} {shards:>12} {files:>10} {d.problems:>8}")
    if rep.problems:
        lines.append("")
        for p in rep.problems:
            lines.append(f"{p.kind:<8} {p.path}: {p.detail}")
    return "\n".join(lines)


def _render_rich(rep) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title=f"guidealign verify {rep.workdir}")
    for col, just in (("directory", "left"), ("kind", "left"), ("shards ok", "right"),
                      ("files ok", "right"), ("problems", "right")):
        t.add_column(col, justify=just)
    for d in rep.dirs:
        shards, files = _cells(d)
        t.add_row(d.path, d.kind, shards, files,
                  f"[bold red]{d.problems}[/]" if d.problems else "0")
    con.print(t)
    if rep.problems:
        p_t = Table(title="findings")
        for col in ("kind", "path", "detail"):
            p_t.add_column(col)
        for p in rep.problems:
            style = _STYLE.get(p.kind, "")
            p_t.add_row(f"[{style}]{p.kind}[/]" if style else p.kind, p.path, p.detail)
        con.print(p_t)


def _render(rep) -> None:
    try:
        import rich  # noqa: F401
    except ImportError:
        click.echo(_render_plain(rep))
        return
    _render_rich(rep)


@click.command("verify")
@run_directory
@click.option("--repair", is_flag=True,
              help="Remove the commit markers of corrupt/missing shards with their shard and quarantine "
                   "files (and the _done.json of bad artifacts) and delete orphan files, so rerunning the stages redoes exactly those; "
                   "also the temp files a killed write of a JSON record left (notes), on a passing check too. "
                   "Only while no stage writes in WORKDIR: a live writer's temp files on another host, "
                   "and build folders (.index.tmp-*, sft/.tmp-model), count as orphans.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def verify(workdir, repair, as_json):
    """Re-checksum every committed shard and artifact of a run directory against its marker.

    Lists corrupt, missing and orphaned files (temp files, shard files without a marker,
    markers without a shard); exits 1 when there is any. Shards not committed yet are listed
    as pending and do not fail the check, as are shards committed under an earlier config or
    input (stale: `guidealign status` does not count them done). Run it while no stage writes
    to WORKDIR.
    """
    from guidealign.shards.verify import repair as do_repair, verify_run

    rep = verify_run(workdir)
    if not rep.dirs and not rep.problems:  # a mistyped directory must not pass as a clean check
        raise click.ClickException(f"{workdir}: no dataset or artifact here; is it a run directory "
                                   "(the -w/--workdir of the stages)?")
    # (also on a passing check: a dead writer's temp file of a JSON record is a note that
    # --repair removes; a live writer's temp files are notes it leaves alone)
    removed = do_repair(rep) if repair else []
    if as_json:
        out = rep.to_dict()
        if repair:
            out["removed"] = removed
        click.echo(json.dumps(out, indent=1))
    else:
        _render(rep)
        if rep.ok:
            pending = len({p.path for p in rep.problems if p.kind == "pending"})  # datasets
            click.echo(f"OK: {sum(d.shards_ok for d in rep.dirs)} shard(s) and "
                       f"{sum(d.files_ok for d in rep.dirs)} artifact file(s) match their records"
                       + (f"; {pending} dataset(s) not complete yet" if pending else ""))
            for r in removed:  # notes only (temp files of interrupted record writes)
                click.echo(f"  removed {r}")
        elif repair:
            click.echo(f"repaired: removed {len(removed)} path(s); rerun the affected stages "
                       f"to redo exactly those shards/artifacts")
            for r in removed:
                click.echo(f"  removed {r}")
        else:
            click.echo(f"FAILED: {len(rep.failing)} problem(s); `guidealign verify --repair "
                       f"{workdir}` removes their commit records so a rerun redoes them")
    raise SystemExit(0 if rep.ok else 1)
