"""The `prep` command in-process (typer's CliRunner): help of every command, stages, inspect, run with
--json/--dry-run, and errors as one line with a non-zero exit and no traceback unless --debug."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from prep import cli
from prep.cli import app
from prep.formats.tar_write import write_shard
from prep.stages import STAGE_ORDER

runner = CliRunner()
COMMANDS = ["run", "stages", "verify", "inspect", "report", "keys", "config"]
ONLY_WDINFO = [a for s in STAGE_ORDER if s != "generate_wdinfo" for a in ("--set", f"{s}.enable=false")]


def shards(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n):
        write_shard(
            folder / f"shard-{s}.tar",
            [(f"k{s}_{i}", {"jpg": b"\xff" * 10, "txt": f"a cat {i}".encode()}) for i in range(3)],
            fsync=False,
        )
    return folder


@pytest.mark.parametrize("command", [[], *([c] for c in COMMANDS)])
def test_help_of_every_command(command: list[str]) -> None:
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    if not command:
        assert all(c in result.output for c in COMMANDS)


def _commands(group, path=()):
    for name, command in group.commands.items():
        yield (*path, name), command
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))


def test_command_lists_show_each_summary_as_one_wrapped_sentence() -> None:
    """A group's command list shows each command's first help paragraph with its line breaks kept (typer's
    rich mode), so a summary that spans two source lines broke mid-sentence at 80 columns: each summary
    is one source line, its details a paragraph of their own."""
    import typer.main

    listed = 0
    for path, command in _commands(typer.main.get_command(app)):
        summary = (command.help or "").strip().split("\n\n")[0]
        assert "\n" not in summary, f"prep {' '.join(path)}: the summary spans lines: {summary!r}"
        listed += 1
    assert listed >= len(COMMANDS) + 3  # the pipeline group's commands are walked too


def test_run_help_documents_the_conventions() -> None:
    text = runner.invoke(app, ["run", "--help"], terminal_width=200).output
    for flag in [
        "--config",
        "--set",
        "--dry-run",
        "--workers",
        "--task-index",
        "--num-tasks",
        "--json",
        "--strict",
        "--force",
        "--runner",
    ]:
        assert flag in text


def test_stages_lists_every_stage_in_order() -> None:
    result = runner.invoke(app, ["stages"], terminal_width=250)
    assert result.exit_code == 0
    positions = [result.output.index(s) for s in STAGE_ORDER]
    assert positions == sorted(positions)
    assert "wdinfo.pkl" in result.output


def test_inspect_prints_samples_and_captions(tmp_path: Path) -> None:
    shards(tmp_path, 1)
    result = runner.invoke(app, ["inspect", str(tmp_path / "shard-0.tar")], terminal_width=250)
    assert result.exit_code == 0
    assert "3 samples" in result.output and "k0_2" in result.output and "a cat 1" in result.output
    one = runner.invoke(app, ["inspect", str(tmp_path / "shard-0.tar"), "-n", "1"], terminal_width=250)
    assert "k0_0" in one.output and "k0_1" not in one.output
    (tmp_path / "bad.tar").write_bytes(b"nope" * 200)
    bad = runner.invoke(app, ["inspect", str(tmp_path / "bad.tar")])
    assert bad.exit_code == 1 and bad.output.startswith("error: ") and bad.output.count("\n") == 1
    assert "checksum" in bad.output and str(tmp_path / "bad.tar") in bad.output
    data = (tmp_path / "shard-0.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: 2 * 2048 + 700])  # two whole samples, then damage
    cut = runner.invoke(app, ["inspect", str(tmp_path / "cut.tar")], terminal_width=250)
    assert cut.exit_code == 1 and "2 samples" in cut.output and "k0_1" in cut.output
    assert "error: " in cut.output and "truncated at byte 4796" in cut.output
    weird = tmp_path / "w.tar"
    write_shard(weird, [("[bold]x[/bold]", {"txt": b"[red]caption[/red]"})])
    shown = runner.invoke(app, ["inspect", str(weird)], terminal_width=250).output
    assert "[bold]x[/bold]" in shown and "[red]caption[/red]" in shown, "keys and captions are not markup"
    hostile = tmp_path / "esc"
    hostile.mkdir()
    write_shard(hostile / "e.tar", [("k\x1b[32mgreen", {"txt": b"\x1b]0;TITLE\x07 \xe2\x80\xae back"})])
    for target in (hostile / "e.tar", hostile):  # a shard's samples, a folder's table
        out = runner.invoke(app, ["inspect", str(target)], terminal_width=250).output
        assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out, "control characters escaped"
    out = runner.invoke(app, ["inspect", str(hostile / "e.tar")], terminal_width=250).output
    assert "k\\x1b[32mgreen" in out and "\\x1b]0;TITLE\\x07 \\u202e back" in out


def test_inspect_a_folder_prints_its_shard_table(tmp_path: Path) -> None:
    shards(tmp_path, 3)
    (tmp_path / "sub").mkdir()
    write_shard(tmp_path / "sub" / "x.tar", [("a", {"jpg": b"1"}), ("b", {"jpg": b"2", "txt": b"t"})])
    runner.invoke(app, ["run", "generate_wdinfo", "--set", f"generate_wdinfo.input_dir={tmp_path}", "-q"])
    (tmp_path / "shard-1.tar.idx").unlink()
    result = runner.invoke(app, ["inspect", str(tmp_path)], terminal_width=250)
    assert result.exit_code == 0, result.output
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in result.output.splitlines() if line.count("│") == 6}
    size = (tmp_path / "shard-0.tar").stat().st_size
    assert rows["shard-0.tar"] == ["3", f"{size:,}", "jpg, txt", "yes"]
    assert rows["shard-1.tar"][3] == "missing"
    assert rows["sub/x.tar"][:1] + rows["sub/x.tar"][2:] == ["2", "jpg, txt (1)", "yes"]
    assert "4 shards" in result.output and "11 samples" in result.output
    one = runner.invoke(app, ["inspect", str(tmp_path), "-n", "1"], terminal_width=250)
    assert "3 more shards" in one.output and "shard-1.tar" not in one.output


def test_run_json_summary_parses(tmp_path: Path) -> None:
    shards(tmp_path)
    result = runner.invoke(
        app, ["run", "generate_wdinfo", "--set", f"generate_wdinfo.input_dir={tmp_path}", "--json"]
    )
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc["ok"] and doc["done"] == 2 and doc["counts"]["samples"] == 6 and doc["finalized"]
    again = json.loads(
        runner.invoke(
            app, ["run", "generate_wdinfo", "--set", f"generate_wdinfo.input_dir={tmp_path}", "--json"]
        ).stdout
    )
    assert again["skipped"] == 2 and again["done"] == 0


def test_run_all_runs_enabled_stages(tmp_path: Path) -> None:
    shards(tmp_path)
    result = runner.invoke(
        app, ["run", "all", *ONLY_WDINFO, "--set", f"generate_wdinfo.input_dir={tmp_path}", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["stage"] == "generate_wdinfo"
    none = runner.invoke(app, ["run", "all", *ONLY_WDINFO, "--set", "generate_wdinfo.enable=false"])
    assert none.exit_code == 1 and "every stage has enable: false" in none.output


def test_run_summary_table_and_failure_exit(tmp_path: Path) -> None:
    shards(tmp_path)
    (tmp_path / "shard-1.tar").write_bytes(b"x" * 2048)
    result = runner.invoke(
        app, ["run", "generate_wdinfo", "--set", f"generate_wdinfo.input_dir={tmp_path}"], terminal_width=250
    )
    assert result.exit_code == 1
    assert "prep run generate_wdinfo" in result.output and "1 / 0 / 1" in result.output
    assert "error: 0-shard-1.tar:" in result.output and "Traceback" not in result.output


def test_dry_run_prints_the_plan(tmp_path: Path) -> None:
    shards(tmp_path)
    result = runner.invoke(
        app,
        ["run", "generate_wdinfo", "--set", f"generate_wdinfo.input_dir={tmp_path}", "--dry-run"],
        terminal_width=250,
    )
    assert result.exit_code == 0 and "plan: generate_wdinfo (2 tasks)" in result.output
    assert not (tmp_path / "wdinfo.pkl").exists()


def test_slurm_flags(tmp_path: Path) -> None:
    shards(tmp_path, 3)
    base = [
        "run",
        "generate_wdinfo",
        "--set",
        f"generate_wdinfo.input_dir={tmp_path}",
        "--json",
        "--num-tasks",
        "2",
    ]
    first = json.loads(runner.invoke(app, [*base, "--task-index", "0"]).stdout)
    assert first["tasks_in_slice"] == 2 and first["waiting_for_other_slices"]
    second = json.loads(runner.invoke(app, [*base, "--task-index", "1"]).stdout)
    assert second["tasks_in_slice"] == 1 and second["finalized"]
    bad = runner.invoke(app, [*base, "--task-index", "2"])
    assert bad.exit_code == 1 and "not a valid slice" in bad.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "nope"], "unknown stage 'nope'"),
        (["run", "generate_wdinfo", "--config", "/no/such.yaml"], "config file not found"),
        (["run", "generate_wdinfo", "--set", "generate_wdinfo.bogus=1"], "unknown key generate_wdinfo.bogus"),
        (["run", "generate_wdinfo", "--set", "generate_wdinfo.input_dir=/no/such/dir"], "does not exist"),
        (
            ["run", "generate_wdinfo", "--runner", "dask", "--set", "generate_wdinfo.input_dir=."],
            "unknown runner",
        ),
        (["config", "--set", "generate_wdinfo.tar_chunk_size=-3"], "greater than or equal to 1"),
        (["inspect", "/no/such.tar"], "shard not found"),
    ],
)
def test_errors_are_one_line_without_traceback(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    assert message in result.output and " — fix: " in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)


def test_debug_shows_the_traceback() -> None:
    result = runner.invoke(app, ["--debug", "run", "nope"])
    assert result.exit_code != 0 and type(result.exception).__name__ == "PrepError"
    cli._state["debug"] = False


def test_main_turns_unexpected_errors_into_one_line(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def broken(*a, **k):
        raise PermissionError(13, "Permission denied", "/data/shards")

    monkeypatch.setattr("prep.config.load_config", broken)
    monkeypatch.setattr(sys, "argv", ["prep", "run", "generate_wdinfo"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: PermissionError") and "/data/shards" in err and err.count("\n") == 1
    monkeypatch.setattr(sys, "argv", ["prep", "--debug", "run", "generate_wdinfo"])
    with pytest.raises(PermissionError):
        cli.main()
    cli._state["debug"] = False


@pytest.mark.parametrize(
    ("argv", "code", "first_line"),
    [
        (["run", "generate_wdinfo", "-w", "0"], 2, "error: prep run: Invalid value for '--workers'"),
        (["run", "--bogus"], 2, "error: prep run: No such option: --bogus"),
        (["bogus"], 2, "error: prep: No such command 'bogus'."),
        (["verify"], 2, "error: prep verify: Missing argument 'folder'."),
        (["inspect", "/no/such.tar"], 1, "error: /no/such.tar: shard not found"),
        ([], 0, None),
    ],
)
def test_the_console_script_gives_usage_errors_in_one_line(monkeypatch, capsys, argv, code, first_line):
    """A wrong option or argument is one line naming the command and its --help, exit 2 (not click's
    boxed usage text); a command's own exit code comes through; `prep` alone prints its help."""
    monkeypatch.setattr(sys, "argv", ["prep", *argv])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == code
    out = capsys.readouterr()
    if first_line is None:
        assert "Usage: prep" in out.out and out.err == ""
        return
    assert out.err.startswith(first_line) and out.err.count("\n") == 1, out.err
    assert code == 1 or out.err.rstrip().endswith(f"— fix: see {first_line.split(': ')[1]} --help")


def test_a_full_disk_is_one_line_with_its_fix(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("prep.config.load_config", full)
    monkeypatch.setattr(sys, "argv", ["prep", "run", "generate_wdinfo"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.count("\n") == 1
    assert "No space left on device — fix: free space on that disk" in err and "--debug" not in err


def test_config_command_prints_resolved_yaml(tmp_path: Path) -> None:
    result = runner.invoke(app, ["config", "--set", "dataset_output_root=/data/x"])
    assert result.exit_code == 0
    assert "output_dir: /data/x/tarfiles_reorganized" in result.output


def test_keys_lists_every_config_field_with_its_description():
    from typer.testing import CliRunner

    from prep.cli import app
    from prep.stages import get_stage

    result = CliRunner().invoke(app, ["keys", "generate_wdinfo"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for key, field in get_stage("generate_wdinfo").Config.model_fields.items():
        assert key in result.output
        assert field.description.split()[0] in result.output
    bad = CliRunner().invoke(app, ["keys", "no_such_stage"])
    assert bad.exit_code == 1 and "unknown stage" in bad.output


def test_keys_at_80_columns_cut_nothing():
    from prep.stages import get_stage
    from prep.stages.base import key_docs

    result = CliRunner().invoke(app, ["keys"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "…" not in result.output and "pydantic" not in result.output
    assert max(len(line.rstrip()) for line in result.output.splitlines()) <= 80
    lines = {line.strip() for line in result.output.splitlines()}
    flat = " ".join(result.output.split())
    for name in STAGE_ORDER:
        for k in key_docs(get_stage(name).Config):
            assert f"{name}.{k.key}" in lines or f"{name}.{k.key}  {k.type} = {k.default}" in lines, k.key
            assert " ".join(f"{name}.{k.key} {k.type} = {k.default}".split()) in flat, (name, k.key)
    assert "download_parquet.hf_token  SecretStr | None = None" in lines


@pytest.mark.parametrize("stage", STAGE_ORDER)
def test_run_stage_help_lists_that_stages_keys(stage: str):
    from prep.stages import get_stage

    result = CliRunner().invoke(app, ["run", stage, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert f"prep keys {stage}" in flat
    for key in get_stage(stage).Config.model_fields:
        assert key in flat
    generic = CliRunner().invoke(app, ["run", "--help"], env={"COLUMNS": "80"})
    assert "prep keys STAGE" in " ".join(generic.output.split())


@pytest.mark.slow  # real img2dataset
def test_minimal_configs_run_all_without_folder_keys(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    from prep.testing.servers import mixed_rows, serve_images, url_table

    base = (f"dataset_output_root: {tmp_path / 'data'}\ndownload_parquet:\n  source_path: {{src}}\n"
            "download_images:\n  download_num_processes: 1\n  download_num_threads: 4\n"
            "precache_encodings:\n  enable: false\n")
    configs = {  # the second finds the downloads done (same root) and goes on from them
        "download_only": base + "reorganize_tar:\n  enable: false\ngenerate_wdinfo:\n  enable: false\n",
        "download_reorganize_wdinfo": base + "reorganize_tar:\n  tar_chunk_size: 4\n",
    }
    with serve_images() as srv:
        src = tmp_path / "src.parquet"
        pq.write_table(url_table(mixed_rows(srv, good=7, missing=1)), src)
        for name, text in configs.items():
            path = tmp_path / f"{name}.yaml"
            path.write_text(text.format(src=src))
            cmd = [sys.executable, "-m", "prep.cli", "run", "all", "-c", str(path), "--json"]
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stdout + result.stderr
            docs = json.loads(result.stdout)
            assert all(d["ok"] for d in docs) and "WARNING" not in json.dumps(docs)
            assert docs[1]["counts"]["samples_out"] == 7
            if name == "download_only":
                assert [d["stage"] for d in docs] == ["download_parquet", "download_images"]
                assert docs[1]["done"] == 1
            else:
                assert [d["stage"] for d in docs] == ["download_parquet", "download_images", "reorganize_tar",
                                                      "generate_wdinfo"] and docs[1]["skipped"] == 1
                wdinfo = tmp_path / "data" / "tarfiles_reorganized" / "wdinfo.pkl"
                assert wdinfo.exists() and docs[-1]["counts"]["samples"] == 7
