"""The `prep` command: run stages, list them, verify and inspect shards.

Errors reach the user as one red line (what, where, how to fix) and a non-zero exit; `--debug`
shows the traceback. torch is imported only by the stages that need it, so start-up stays fast.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import typer
import typer.core
from rich.console import Console
from rich.padding import Padding
from rich.table import Table
from rich.text import Text

from prep.errors import PrepError, labelled_line, terminal_text, unexpected_line

app = typer.Typer(
    name="prep",
    help="Turn caption+URL tables into training-ready WebDataset shards. "
    "Stages run alone (`prep run STAGE --config FILE`) or chained (`prep run all`).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)
out_console = Console()
_state = {"debug": False}


def _fail(err: PrepError) -> None:
    for e in getattr(err, "errors", [err]):
        _print_error(e.line())
    raise typer.Exit(1)


def _show_version(value: bool) -> None:
    if value:
        from prep import __version__

        out_console.print(f"prep {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="show Python tracebacks for errors"),
    version: bool = typer.Option(False, "--version", callback=_show_version, is_eager=True,
                                 help="print prep's version and exit"),
) -> None:
    _state["debug"] = debug


@app.command("stages")
def stages_cmd() -> None:
    """List the stages in pipeline order, one line each."""
    from prep.stages import STAGE_ORDER, get_stage

    table = Table(show_header=True, header_style="bold")
    table.add_column("#")
    table.add_column("stage")
    table.add_column("what it does")
    for i, name in enumerate(STAGE_ORDER, 1):
        table.add_row(str(i), name, get_stage(name).TITLE)
    out_console.print(table)


class _RunCommand(typer.core.TyperCommand):
    """`prep run STAGE --help` ends with that stage's keys (the generic help alone would not say them)."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:  # typer's own click Context
        ctx.meta["prep_run_args"] = list(args)  # --help is handled while parsing, before `stage` is set
        return super().parse_args(ctx, args)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        super().format_help(ctx, formatter)
        from prep.stages import STAGE_ORDER, get_stage
        from prep.stages.base import key_docs

        stage = next((a for a in ctx.meta.get("prep_run_args", []) if a in STAGE_ORDER), None)
        if stage is not None:
            keys = ", ".join(k.key for k in key_docs(get_stage(stage).Config))
            out_console.print(f"{stage} keys (set with --set {stage}.KEY=VALUE or in the config's "
                              f"{stage}: section): {keys}.\nTypes, defaults and what each does: "
                              f"prep keys {stage}", highlight=False, markup=False)


@app.command("run", cls=_RunCommand,
             epilog="Every key of a stage, with its type, default and what it does: prep keys STAGE")
def run_cmd(
    stage: str = typer.Argument(..., help="a stage name (see `prep stages`) or `all` for every enabled stage "
                                "in order"),
    config: Path | None = typer.Option(None, "--config", "-c", help="the stage config YAML (the "
                                       "template under configs/ documents every key; so does `prep keys`)"),
    set_: list[str] = typer.Option([], "--set", help="override a config key: --set SECTION.KEY=VALUE, "
                                   "e.g. --set ingest_local.enable=true (repeatable; values are typed "
                                   "as YAML)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan (tasks) and exit without running"),
    runner: str = typer.Option("local", "--runner", help="local (process pool) or ray"),
    ray_address: str | None = typer.Option(None, "--ray-address",
                                           help="Ray cluster address; local Ray when unset"),
    workers: int = typer.Option(1, "--workers", "-w", min=1, help="parallel tasks for the local runner"),
    task_index: int | None = typer.Option(None, "--task-index", help="Slurm arrays: run slice I of the plan "
                                          "(e.g. $SLURM_ARRAY_TASK_ID)"),
    num_tasks: int | None = typer.Option(None, "--num-tasks", help="Slurm arrays: the number of slices "
                                         "(e.g. $SLURM_ARRAY_TASK_COUNT)"),
    strict: bool = typer.Option(False, "--strict",
                                help="turn warnings (uneven shards, damaged tars) into failures"),
    retry_failed: bool = typer.Option(False, "--retry-failed",
                                      help="download_images: re-fetch only URLs that failed"),
    force: bool = typer.Option(False, "--force", help="ignore done-markers and redo every task"),
    verify_markers: bool = typer.Option(False, "--verify-markers", help="re-hash outputs before trusting a "
                                        "done-marker (slower, catches edited outputs)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as JSON on stdout"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar"),
) -> None:
    """Run one stage (or `all`), resuming from done-markers; exit 0 only if every task succeeded."""
    from prep.config import load_config
    from prep.runtime.runner import run_stage
    from prep.runtime.summary import print_summary
    from prep.stages import STAGE_ORDER
    from prep.stages.base import RunOptions

    try:
        cfg = load_config(config, set_)
        opts = RunOptions(workers=workers, runner=runner, ray_address=ray_address, task_index=task_index,
                          num_tasks=num_tasks, dry_run=dry_run, strict=strict, retry_failed=retry_failed,
                          verify_markers=verify_markers, force=force, json=as_json, quiet=quiet or as_json,
                          debug=_state["debug"])
        names = [s for s in STAGE_ORDER if getattr(cfg, s).enable] if stage == "all" else [stage]
        if stage == "all" and not names:
            raise PrepError("every stage has enable: false", str(config), "enable at least one stage")
        docs = []
        ok = True
        for name in names:
            run = run_stage(name, cfg, opts, err_console)
            docs.append(run.to_json())
            if dry_run:
                _print_plan(run)
            elif not as_json:
                print_summary(run, err_console)
            if not run.ok:
                ok = False
                break
            if stage == "all" and run.waiting_for_other_slices:
                break  # the next stage needs the whole previous stage (Slurm: afterok on the whole array)
        if as_json:
            sys.stdout.write(json.dumps(docs[0] if len(docs) == 1 else docs, indent=1) + "\n")
        if not ok:
            raise typer.Exit(1)
    except PrepError as err:
        if _state["debug"]:
            raise
        _fail(err)


def _print_plan(run) -> None:
    table = Table(title=f"plan: {run.stage} ({run.planned} tasks)", header_style="bold")
    table.add_column("task")
    table.add_column("inputs")
    for r in run.results[:50]:
        payload = r.data.get("payload", {})
        table.add_row(r.task_id, json.dumps(payload, default=str)[:100])
    out_console.print(table)
    if len(run.results) > 50:
        out_console.print(f"… {len(run.results) - 50} more tasks")


@app.command("verify")
def verify_cmd(
    folder: Path = typer.Argument(..., help="a shard folder (with manifest.json from generate_wdinfo)"),
    as_json: bool = typer.Option(False, "--json", help="print the result as JSON"),
) -> None:
    """Check every shard against its .idx and manifest.json; exit 1 naming bad shards.

    Each shard's samples, bytes and checksum are compared with what the manifest recorded."""
    from prep.formats.tar import shard_files
    from prep.runtime.progress import task_progress
    from prep.verify import require_folder, verify_folder

    try:
        n = len(shard_files(require_folder(folder)))
        with task_progress(err_console, "verify", n, disable=as_json) as advance:
            checks = verify_folder(folder, advance)
    except PrepError as err:
        if _state["debug"]:
            raise
        _fail(err)
    bad = [c for c in checks if c.problems]
    n_shards = sum(1 for c in checks if c.path.endswith(".tar"))
    if as_json:
        doc = {"shards": n_shards, "bad": {c.path: c.problems for c in bad}}
        sys.stdout.write(json.dumps(doc, indent=1) + "\n")
    else:
        for c in bad:
            for p in c.problems:
                label = "bad shard: " if c.path.endswith(".tar") else "bad metadata: "
                err_console.print(Text(label, style="bold red") + Text(f"{c.path}: {p}"),
                                  highlight=False, soft_wrap=True)
        status = "[green]all good[/]" if not bad else f"[red]{len(bad)} bad[/]"
        err_console.print(f"verified {n_shards} shards: {status}")
    if bad:
        raise typer.Exit(1)


@app.command("inspect")
def inspect_cmd(
    shard: Path = typer.Argument(..., help="a .tar shard, or a shard folder (one line per shard)"),
    limit: int = typer.Option(10, "--limit", "-n", help="samples (or shards, for a folder) to show; 0 = all"),
) -> None:
    """Print a shard's samples, or a folder's shard table.

    A shard: each sample's key, members with sizes and offsets, and the caption when there is one. A
    damaged shard shows the samples before the damage, then the error (exit 1). A folder: one line per
    shard with samples, bytes, member types and whether the .idx is there."""
    from prep.formats.tar import read_member, scan_tar

    if shard.is_dir():
        _inspect_folder(shard, limit)
        return
    try:
        scan = scan_tar(shard, tolerate_damage=True)
        if scan.error is not None and not scan.samples:
            raise scan.error
    except PrepError as err:
        if _state["debug"]:
            raise
        _fail(err)
    title = Text(f"{shard} — {len(scan.samples)} samples, {scan.end:,} bytes of samples")
    table = Table(title=title, header_style="bold")
    table.add_column("#", justify="right")
    table.add_column("key", overflow="fold")  # folded, never cut: a key is what one greps for
    table.add_column("offset", justify="right")
    table.add_column("members (bytes)")
    table.add_column("txt")
    shown = scan.samples if limit == 0 else scan.samples[:limit]
    with open(shard, "rb") as f:
        for i, s in enumerate(shown):
            members = ", ".join(f"{ext} ({m.size:,})" for ext, m in sorted(s.members.items()))
            caption = ""
            if "txt" in s.members and s.members["txt"].size < 4096:
                caption = read_member(f, s.members["txt"]).decode("utf-8", "replace")[:60]
            table.add_row(str(i), terminal_text(s.key), f"{s.offset:,}", terminal_text(members),
                          terminal_text(caption))
    out_console.print(table)
    for name, why in scan.skipped[:10]:
        out_console.print(f"skipped member {name!r}: {why}", highlight=False, markup=False)
    if scan.error is not None:
        _print_error(f"{scan.error.line()} (the samples above come before the damage)")
        raise typer.Exit(1)


def _inspect_folder(folder: Path, limit: int) -> None:
    """One row per shard, from a header walk of each shown shard (no member is read)."""
    from prep.formats.index import index_path
    from prep.formats.tar import scan_tar, shard_files

    tars = shard_files(folder)
    if not tars:
        _fail(PrepError("no .tar shards found", str(folder), "point prep inspect at a shard or shard folder"))
    shown = tars if limit == 0 else tars[:limit]
    table = Table(title=Text(f"{folder} — {len(tars):,} shards"), header_style="bold")
    table.add_column("shard", overflow="fold")
    table.add_column("samples", justify="right")
    table.add_column("bytes", justify="right")
    table.add_column("members")
    table.add_column(".idx")
    damaged = []
    total = 0
    for tar in shown:
        scan = scan_tar(tar, tolerate_damage=True)
        exts: dict[str, int] = {}
        for sample in scan.samples:
            for ext in sample.members:
                exts[ext] = exts.get(ext, 0) + 1
        total += len(scan.samples)
        rel = tar.relative_to(folder).as_posix()
        if scan.error is not None:
            damaged.append(f"{rel}: {scan.error.line()}")
        members = ", ".join(ext if n == len(scan.samples) else f"{ext} ({n})"
                            for ext, n in sorted(exts.items()))
        table.add_row(terminal_text(rel), f"{len(scan.samples):,}", f"{tar.stat().st_size:,}",
                      terminal_text(members), "yes" if index_path(tar).exists() else "missing")
    out_console.print(table)
    more = f"; {len(tars) - len(shown):,} more shards (--limit 0 shows all)" if len(shown) < len(tars) else ""
    out_console.print(f"{total:,} samples in the {len(shown):,} shards shown{more}. "
                      f"One shard's samples: prep inspect {shown[0]}", highlight=False, markup=False)
    for line in damaged:
        _print_error(line)
    if damaged:
        raise typer.Exit(1)


@app.command("report")
def report_cmd(
    folder: Path = typer.Argument(..., help="a run folder (dataset_output_root) or a shard folder"),
    out: Path | None = typer.Option(None, "--out", "-o", help="where the page goes (default: FOLDER/report)"),
) -> None:
    """Write an HTML page with charts (PNG) of a run or shard folder.

    Charts: samples and bytes per shard, download outcomes by reason, caption and image size
    histograms, stage timings, latent statistics."""
    from prep.report import write_report

    try:
        page = write_report(folder, out)
    except PrepError as err:
        if _state["debug"]:
            raise
        _fail(err)
    # paths on lines of their own, unwrapped: a long one overflows 80 columns alone, and copies whole
    err_console.print(f"wrote the report:\n  {page}\nthe numbers behind each chart:\n  "
                      f"{page.parent / 'report.json'}", highlight=False, markup=False, soft_wrap=True)


@app.command("keys")
def keys_cmd(
    stage: str | None = typer.Argument(None, help="a stage name; all stages when left out"),
) -> None:
    """List every config key of a stage (or of all stages): type, default and what it does."""
    from prep.stages import STAGE_ORDER, get_stage
    from prep.stages.base import key_docs

    try:
        names = [stage] if stage else list(STAGE_ORDER)
        modules = [(n, get_stage(n)) for n in names]
    except PrepError as err:
        if _state["debug"]:
            raise
        _fail(err)
    for name, mod in modules:  # one block per key, wrapped to the terminal: nothing is cut
        out_console.print(Text(f"{name}: {mod.TITLE}", style="bold"))
        for k in key_docs(mod.Config):
            key, typed = Text(f"  {name}.{k.key}", style="bold cyan"), Text(f"{k.type} = {k.default}")
            if len(key) + 2 + len(typed) <= out_console.width:
                out_console.print(key + Text("  ") + typed, highlight=False)
            else:  # the key on its line (grep finds it whole), its type and default below
                out_console.print(key, highlight=False)
                out_console.print(Padding(typed, (0, 0, 0, 6)), highlight=False)
            if k.description:
                out_console.print(Padding(Text(k.description), (0, 0, 0, 6)), highlight=False)
        out_console.print()


@app.command("config")
def config_cmd(
    config: Path | None = typer.Option(None, "--config", "-c", help="the stage config YAML"),
    set_: list[str] = typer.Option([], "--set", help="override a config key (repeatable)"),
) -> None:
    """Print the config after overrides, ${...} interpolation, defaults and validation."""
    import yaml

    from prep.config import load_config

    try:
        cfg = load_config(config, set_)
    except PrepError as err:
        if _state["debug"]:
            raise
        _fail(err)
    out_console.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), highlight=False,
                      markup=False)


pipeline_app = typer.Typer(help="Training pipelines: validate a pipeline YAML and show its plan, write a "
                           "starter, run it.", no_args_is_help=True)
app.add_typer(pipeline_app, name="pipeline")


@pipeline_app.command("validate")
def pipeline_validate_cmd(
    config: Path = typer.Argument(..., help="a pipeline YAML (`training.pipeline`, or the section alone)"),
    set_: list[str] = typer.Option([], "--set", help="override a key by its path in the file: --set "
                                   "steps.0.n_epochs=3 (with training.pipeline. before it in a full "
                                   "config; repeatable; values typed as YAML)"),
    as_json: bool = typer.Option(False, "--json", help="print the plan as JSON on stdout"),
    no_data: bool = typer.Option(False, "--no-data", help="check the config only; do not open the datasets"),
    world_size: int = typer.Option(1, "--world-size", min=1, help="ranks the plan assumes (batch sizes are "
                                   "per rank)"),
) -> None:
    """Check a pipeline YAML (every problem at once, with its line) and print its plan.

    The plan, per step: the data tree, batch size and workers (and where each came from), sizes,
    length, modules, optimizers, transition and cadences. Exit 1 on any problem. With --json, every
    outcome is one JSON document on stdout, a config that cannot be read or parsed included."""
    from prep.pipeline import parse_pipeline_config
    from prep.pipeline.plan import make_plan, render_plan

    errors: list[PrepError] = []
    plans = []
    try:
        cfg = parse_pipeline_config(config, overrides=set_)
        plans = make_plan(cfg, build=not no_data, world_size=world_size)
    except PrepError as err:
        if _state["debug"]:
            raise
        if not as_json:
            _fail(err)
        errors = list(getattr(err, "errors", [err]))
    except Exception as err:  # a bug, or a user's module that raises: main() prints it, but not as JSON
        if _state["debug"] or not as_json:
            raise
        what, _, fix = unexpected_line(err).partition(" — fix: ")
        errors = [missing_extra(err) if isinstance(err, ModuleNotFoundError)
                  else PrepError(what, None, fix or "run with --debug for the traceback")]
    errors += [p for plan in plans for p in plan.problems]
    warnings = [w for plan in plans for w in plan.warnings]
    if as_json:
        from prep.pipeline.config import error_doc

        doc = {"config": str(config), "ok": not errors, "errors": [error_doc(e, str(config)) for e in errors],
               "warnings": [error_doc(w, str(config)) for w in warnings],
               "steps": [p.to_json() for p in plans]}
        sys.stdout.write(json.dumps(doc, indent=1) + "\n")
    else:
        render_plan(plans, out_console, title=f"pipeline plan: {config}")
    for w in warnings:
        _print_warning(w.line())
    for e in errors:
        _print_error(e.line())
    if errors:
        raise typer.Exit(1)
    if not as_json:
        noted = f", {len(warnings)} warning{'s' * (len(warnings) != 1)}" if warnings else ""
        err_console.print(f"[green]{config}: {len(plans)} steps, no problems{noted}[/]")


@pipeline_app.command("example")
def pipeline_example_cmd(
    path: Path | None = typer.Argument(None, help="where to write it (stdout when left out)"),
    force: bool = typer.Option(False, "--force", help="overwrite an existing file"),
) -> None:
    """Write a commented starter pipeline YAML (configs/pipelines/example.yaml)."""
    from prep.formats.atomic import write_bytes_atomic
    from prep.pipeline import example_yaml

    text = example_yaml()
    if path is None:
        sys.stdout.write(text)
        return
    if path.exists() and not force:
        _fail(PrepError("file exists", str(path), "pass --force to overwrite it, or name another file"))
    write_bytes_atomic(path, text.encode())
    err_console.print(f"wrote {path}; check it with: prep pipeline validate {path}")


@pipeline_app.command("run")
def pipeline_run_cmd(
    config: Path = typer.Argument(..., help="a pipeline YAML"),
    entry: str | None = typer.Option(None, "--entry", help="module:build — your function build(config) -> "
                                     "(modules, trainers); default: the config's models: and prep's "
                                     "reference trainers (vae, flow)"),
    set_: list[str] = typer.Option([], "--set", help="override a key (repeatable; values typed as YAML)"),
    checkpoint_dir: Path | None = typer.Option(None, "--checkpoint-dir", help="where checkpoints go "
                                               "(default: runs/CONFIG-NAME)"),
    resume: str = typer.Option("auto", "--resume", help="auto (the newest checkpoint there), never, or a "
                               "checkpoint path; refused if the folder holds checkpoints past the start"),
    allow_config_change: bool = typer.Option(False, "--allow-config-change", help="resume even though the "
                                             "current or a finished step changed"),
    stop_after: int | None = typer.Option(None, "--stop-after", min=1, help="train at most N batches in this "
                                          "run, then checkpoint and exit (jobs with a time limit)"),
    device: str | None = typer.Option(None, "--device", help="cuda, cuda:1, cpu (default: cuda if available; "
                                      "under torchrun, cuda:LOCAL_RANK)"),
    keep_last: int = typer.Option(3, "--keep-last", min=1, help="regular checkpoints kept (step ends are "
                                  "always kept)"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="no progress bar or summary"),
) -> None:
    """Run a pipeline, resuming from its newest checkpoint; the same under torchrun.

    It runs with your modules and trainers, or with its models: section and prep's reference trainers.
    Exit 0 when every step finished (or --stop-after stopped it with a checkpoint)."""
    import importlib
    import os

    from prep.pipeline import parse_pipeline_config
    from prep.pipeline.orchestrator import TrainingPipelineOrchestrator

    try:
        if entry is None:
            from prep.pipeline.trainers import build_reference

            build = build_reference
        else:
            module_name, _, attr = entry.partition(":")
            try:
                build = getattr(importlib.import_module(module_name), attr)
            except (ImportError, AttributeError) as err:
                raise PrepError(f"cannot load the entry {entry!r} ({err})", "--entry",
                                "pass module:function, importable from here (PYTHONPATH)") from None
        cfg = parse_pipeline_config(config, overrides=set_)
        modules, trainers = build(cfg)
        if device is None and "LOCAL_RANK" in os.environ:
            import torch

            device = f"cuda:{os.environ['LOCAL_RANK']}" if torch.cuda.is_available() else "cpu"
        orch = TrainingPipelineOrchestrator(
            cfg, modules, trainers, checkpoint_dir or Path("runs") / config.stem, device=device,
            resume=resume, allow_config_change=allow_config_change, keep_last=keep_last, progress=not quiet,
            console=err_console)
        orch.run(max_batches=stop_after)
    except PrepError as err:
        if _state["debug"]:
            raise
        _fail(err)


def _print_error(line: str) -> None:
    err_console.print(labelled_line("error", line), highlight=False, soft_wrap=True)


def _print_warning(line: str) -> None:
    err_console.print(labelled_line("warning", line), highlight=False, soft_wrap=True)


_EXTRA_REQ = re.compile(r"""([A-Za-z0-9_.-]+)[^;]*;\s*extra\s*==\s*['"]([^'"]+)['"]""")


def missing_extra(err: ModuleNotFoundError) -> PrepError:
    """Name the extra that provides a missing module, read from prep's own metadata (pyproject's
    optional-dependencies are the one home of that mapping)."""
    from importlib import metadata

    module = (err.name or "").split(".")[0]
    wanted = module.lower().replace("_", "-")
    try:
        requires = metadata.requires("prep") or []
    except metadata.PackageNotFoundError:
        requires = []
    extras = [m[2] for m in map(_EXTRA_REQ.match, requires)
              if m and m[1].lower().replace("_", "-") == wanted and m[2] not in ("all", "dev", "bench")]
    fix = f"pip install 'prep[{extras[0]}]' (or 'prep[all]')" if extras else f"pip install {module}"
    return PrepError(f"this command needs {module}, which is not installed", "prep", fix)


def main() -> None:
    """The console script: every error is one line and exit 1 (a wrong option or argument: exit 2);
    `--debug` re-raises with the traceback."""
    try:
        code = app(prog_name="prep", standalone_mode=False)  # click's errors come here, not boxed
    except typer.Abort:  # Ctrl-C outside a stage's own handling
        sys.exit(130)
    except PrepError as err:  # raised outside a command's own handler
        if _state["debug"]:
            raise
        for e in getattr(err, "errors", [err]):
            _print_error(e.line())
        sys.exit(1)
    except ModuleNotFoundError as err:  # a command whose extra is not installed
        if _state["debug"]:
            raise
        _print_error(missing_extra(err).line())
        sys.exit(1)
    except Exception as err:  # an OS error or a bug: still one line, the traceback only with --debug
        if _state["debug"]:
            raise
        if hasattr(err, "format_message") and hasattr(err, "exit_code"):  # click's (vendored by typer)
            ctx = getattr(err, "ctx", None)
            if ctx is not None and not err.format_message():  # a command group called bare: its help
                out_console.print(ctx.get_help(), highlight=False, markup=False)
                sys.exit(0)
            where = ctx.command_path if ctx is not None else "prep"
            _print_error(f"{where}: {err.format_message()} — fix: see {where} --help")
            sys.exit(err.exit_code)
        line = unexpected_line(err)
        _print_error(line if " — fix: " in line else f"{line} — run with --debug for the traceback")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)  # typer.Exit(n) returns n here


if __name__ == "__main__":
    main()
