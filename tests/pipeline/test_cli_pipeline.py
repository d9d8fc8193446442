"""`prep pipeline validate|example` in-process: the example validates (exit 0), the plan and --json
hold what a user needs, problems exit 1 with one line each, and the CLI imports no torch to start."""

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from prep import cli
from prep.cli import app
from prep.pipeline import example_yaml
from prep.testing.pipeline_data import example_data, pipeline_run_args

runner = CliRunner()


def test_example_written_and_validated(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", str(example_data(tmp_path / "data")))
    out = tmp_path / "train.yaml"
    res = runner.invoke(app, ["pipeline", "example", str(out)])
    assert res.exit_code == 0, res.output
    assert out.read_text() == example_yaml()
    assert runner.invoke(app, ["pipeline", "example", str(out)]).exit_code == 1  # no silent overwrite
    monkeypatch.setattr(cli.out_console, "width", 250)
    res = runner.invoke(app, ["pipeline", "validate", str(out)])
    assert res.exit_code == 0, res.output
    for needle in (
        "vae_lowres",
        "web_and_art = blend smooth",
        "0.7 × laion = webdataset",
        "0.3 × art = prep",
        "8 (dataset lowres)",
        "2 (defaults)",
        "CosineAnnealingLR",
        "flow_loss < 0.05 for 3 checks",
        "no problems",
    ):
        assert needle in res.output, needle


def test_json_plan(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", str(example_data(tmp_path / "data")))
    res = runner.invoke(
        app,
        [
            "pipeline",
            "validate",
            "configs/pipelines/example.yaml",
            "--json",
            "--set",
            "training.pipeline.steps.0.batch_size=3",
        ],
    )
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    s0, s1, s2 = doc["steps"]
    assert s0["batch_size"] == [{"dataset": "lowres", "value": 3, "from": "step"}]
    assert s0["samples_per_epoch"] == 12 and s0["batches_per_epoch"] == 4
    assert s0["length"] == {"epochs": 2.0, "batches": 8, "samples": 24, "rule": "n_epochs 2"}
    assert s1["workers"] == {"value": 2, "from": "defaults"}
    assert s2["samples_per_epoch"] == 26 and s2["length"]["rule"] == "transition_on.max_epochs 5"
    assert len({s["fingerprint"] for s in doc["steps"]}) == 3


def test_problems_exit_1_one_line_each(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps:\n  - name: a\n    n_epoch: 1\n  - name: b\n    dataset: x\n    n_epochs: 1\n")
    res = runner.invoke(app, ["pipeline", "validate", str(bad)])
    assert res.exit_code == 1
    lines = [ln for ln in res.output.splitlines() if ln.startswith("error:")]
    assert any(f"{bad}:3: steps.0.n_epoch: unknown key (did you mean n_epochs?)" in ln for ln in lines), (
        res.output
    )
    assert any(f"{bad}:5: steps.1.dataset: names no dataset" in ln for ln in lines), res.output
    assert "Traceback" not in res.output


def _failures(tmp_path, monkeypatch) -> list[tuple[str, list[str], list[tuple[int | None, int | None]]]]:
    """Every way validate fails: (name, its arguments, the (line, column) of each error it reports)."""
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "raises_on_import.py").write_text("raise RuntimeError('boom at import')\n")
    files = {
        "syntax.yaml": "training:\n  pipeline:\n    steps: [a\n",
        "tab.yaml": "steps:\n\t- name: a\n",
        "list.yaml": "- 1\n- 2\n",
        "empty.yaml": "",
        "schema.yaml": "steps:\n  - name: a\n    n_epoch: 1\n  - name: b\n    dataset: x\n    n_epochs: 1\n",
        "dup.yaml": "steps: []\nsteps: []\n",
        "module.yaml": "datasets: {d: {type: prep, path: /nowhere, transform: 'raises_on_import:f'}}\n"
        "steps: [{name: a, dataset: d, n_epochs: 1}]\n",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    (tmp_path / "latin1.yaml").write_bytes(b"steps: [{name: caf\xe9}]\n")
    (tmp_path / "folder.yaml").mkdir()
    monkeypatch.setenv("DATA_ROOT", str(tmp_path / "nothing-here"))
    example = "configs/pipelines/example.yaml"
    missing = [  # the datasets of steps 1-3 (step 3's blend stops at laion), then step 3's validation set
        (next(i for i, t in enumerate(example_yaml().splitlines(), 1) if t.strip().startswith(f"{d}:")), None)
        for d in ("lowres", "highres", "laion", "val")
    ]
    return [
        ("missing file", [str(tmp_path / "missing.yaml")], [(None, None)]),
        ("a folder", [str(tmp_path / "folder.yaml")], [(None, None)]),
        ("not UTF-8", [str(tmp_path / "latin1.yaml")], [(None, None)]),
        ("YAML syntax", [str(tmp_path / "syntax.yaml")], [(4, 1)]),
        ("a tab", [str(tmp_path / "tab.yaml")], [(2, 1)]),
        ("duplicate key", [str(tmp_path / "dup.yaml")], [(2, 1)]),
        ("not a mapping", [str(tmp_path / "list.yaml")], [(None, None)]),
        ("empty", [str(tmp_path / "empty.yaml")], [(None, None)]),
        ("schema", [str(tmp_path / "schema.yaml")], [(3, None), (5, None)]),
        ("bad --set", [example, "--set", "steps.0.n_epochs=1"], [(None, None)]),
        ("dataset", [example], missing),
        ("user module raises", [str(tmp_path / "module.yaml")], [(None, None)]),
    ]


def _prep(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """`prep ARGS` through the console script's main(): its exit code, stdout and stderr."""
    monkeypatch.setattr(sys, "argv", ["prep", *args])
    with pytest.raises(SystemExit) as stop:
        cli.main()
    out = capsys.readouterr()
    return stop.value.code, out.out, out.err


def test_validate_json_is_one_document_on_every_failure(tmp_path, monkeypatch, capsys):
    """Whatever stops validate (the file, its YAML, the schema, an override, the data, a module that
    raises), --json prints one JSON document holding each error's line and the file, line and column it
    points at, and exits 1; without --json the same errors are one `error:` line each, with no JSON and no
    traceback."""
    for name, args, places in _failures(tmp_path, monkeypatch):
        code, out, err = _prep(["pipeline", "validate", *args, "--json"], monkeypatch, capsys)
        assert code == 1, (name, out, err)
        doc = json.loads(out)  # exactly one document: json.loads refuses anything after it
        assert doc["ok"] is False and doc["config"] == args[0], name
        assert [(e["line"], e["column"]) for e in doc["errors"]] == places, (name, doc["errors"])
        for e in doc["errors"]:
            where = f"{e['where']}: " if e["where"] else ""
            assert e["message"] == f"{where}{e['what']} — fix: {e['fix']}", (name, e)
            assert e["file"] == (args[0] if (e["where"] or "").startswith(args[0]) else None), (name, e)
            assert f"error: {e['message']}" in err, name
        code, out, err = _prep(["pipeline", "validate", *args], monkeypatch, capsys)
        lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
        assert code == 1 and not out.lstrip().startswith("{") and "Traceback" not in err, (name, out, err)
        assert len(lines) == len(doc["errors"]), (name, lines)
        assert all(e["what"] in ln for e, ln in zip(doc["errors"], lines, strict=True)), (name, lines)


def test_validate_and_run_warn_about_a_step_with_no_checkpoint_before_its_end(tmp_path, monkeypatch, capsys):
    """A one-epoch step with no checkpoint_every (its only checkpoint is at its end): validate (text and
    --json) and run warn, naming the step, its length and the key to set, at the step's line; validate
    still exits 0. With checkpoint_every shorter than the step, no warning."""
    from prep.testing.loader_data import make_shards

    make_shards(tmp_path / "d", [5, 4], image_size=8, distinct_images=1)
    config = tmp_path / "p.yaml"
    text = (
        f"datasets: {{d: {{type: prep, path: {tmp_path / 'd'}, decode: raw, batch_size: 3}}}}\n"
        "default_dataset: d\ndefaults: {workers: 0}\nsteps:\n  - name: long\n    n_epochs: 1\n"
        "    train: [reg]\n    optimization: {optimizers: {dec: {type: SGD, lr: 0.1}}}\n"
    )
    config.write_text(text)
    want = (f"warning: {config}:5: step 'long' (1 ep = 3 ba, n_epochs 1) writes no checkpoint before its end",
            "fix: set steps.0.checkpoint_every shorter than the step")
    code, out, err = _prep(["pipeline", "validate", str(config)], monkeypatch, capsys)
    assert code == 0 and all(w in err for w in want) and "no problems, 1 warning" in err, err
    code, out, err = _prep(["pipeline", "validate", str(config), "--json"], monkeypatch, capsys)
    doc = json.loads(out)
    assert code == 0 and doc["ok"] and doc["errors"] == [], out
    [warning] = doc["warnings"]
    assert (warning["file"], warning["line"]) == (str(config), 5) and want[0][9:] in warning["message"]
    assert doc["steps"][0]["warnings"] == [warning["message"]]
    code, out, err = _prep(pipeline_run_args(config, tmp_path / "ck"), monkeypatch, capsys)
    assert code == 0 and all(w in err for w in want), err
    config.write_text(text + "    checkpoint_every: 2ba\n")
    code, out, err = _prep(["pipeline", "validate", str(config)], monkeypatch, capsys)
    assert code == 0 and "warning" not in err and "no problems" in err, err


def test_missing_data_is_a_problem_at_the_dataset_line(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", str(tmp_path / "nothing-here"))
    res = runner.invoke(app, ["pipeline", "validate", "configs/pipelines/example.yaml"])
    assert res.exit_code == 1
    line = next(i for i, t in enumerate(example_yaml().splitlines(), 1) if t.strip().startswith("lowres:"))
    assert f"configs/pipelines/example.yaml:{line}: dataset 'lowres': image folder not found" in res.output
    assert (
        runner.invoke(app, ["pipeline", "validate", "configs/pipelines/example.yaml", "--no-data"]).exit_code
        == 0
    )


def test_cli_start_imports_no_torch():
    code = "import sys, prep.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cap_in_the_other_unit_is_checked_against_the_data(tmp_path, monkeypatch):
    monkeypatch.setenv("DATA_ROOT", str(example_data(tmp_path / "data")))
    # step 1 is n_epochs 2 of 2 batches = 4 batches: a max_steps cap of 5 is above it, 4 agrees
    res = runner.invoke(
        app,
        [
            "pipeline",
            "validate",
            "configs/pipelines/example.yaml",
            "--set",
            "training.pipeline.steps.0.transition_on.max_steps=5",
        ],
    )
    assert res.exit_code == 1
    assert "steps.0.transition_on.max_steps: max_steps=5 (5 batches) is above the step's length" in res.output
    res = runner.invoke(
        app,
        [
            "pipeline",
            "validate",
            "configs/pipelines/example.yaml",
            "--set",
            "training.pipeline.steps.0.transition_on.max_steps=4",
        ],
    )
    assert res.exit_code == 0, res.output


def test_run_trains_resumes_and_reports_a_bad_entry(tmp_path):
    from prep.testing.loader_data import make_shards

    make_shards(tmp_path / "d", [5, 4], image_size=8, distinct_images=1)
    config = tmp_path / "p.yaml"
    config.write_text(
        f"datasets: {{d: {{type: prep, path: {tmp_path / 'd'}, decode: raw, batch_size: 3}}}}\n"
        "default_dataset: d\ndefaults: {workers: 0}\nsteps:\n  - {name: s, n_epochs: 2, "
        "train: [reg], optimization: {optimizers: {dec: {type: SGD, lr: 0.1}}}}\n"
    )
    run = pipeline_run_args(config, tmp_path / "ck")
    assert runner.invoke(app, [*run, "--stop-after", "2"]).exit_code == 0
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [".lock", "ckpt-000000000002.pt"]
    res = runner.invoke(app, run)
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "ck").iterdir())[-1] == "step-000-000000000006-s.pt"
    before = {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()}
    # the finished run, re-run: it says so and changes nothing
    again = runner.invoke(app, [a for a in run if a != "--quiet"])
    assert again.exit_code == 0, again.output
    assert "nothing to train — all 1 step(s) were done already" in " ".join(again.output.split())
    assert {p.name: p.read_bytes() for p in (tmp_path / "ck").iterdir()} == before
    res = runner.invoke(app, [*run[:3], "--entry", "prep.testing.pipeline_data:nope"])
    assert res.exit_code == 1 and "cannot load the entry 'prep.testing.pipeline_data:nope'" in res.output
