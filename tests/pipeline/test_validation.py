"""Every validation rule of a pipeline YAML, one config each: the error names the key path and the line
(marked `# <-` in each YAML), and all problems come out at once."""

import pytest

from prep.errors import PrepError, PrepErrorGroup
from prep.pipeline import parse_pipeline_config

HEAD = """\
training:
  pipeline:
    datasets:
      a: {type: prep, path: /data/a}
      b: {type: prep, path: /data/b}
    default_dataset: a
    steps:
"""


def _errors(tmp_path, text: str, **kw) -> list:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(PrepErrorGroup) as err:
        parse_pipeline_config(path, **kw)
    return err.value.errors


def _marked_line(text: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if "# <-" in line)


S1 = "      - name: s\n        n_epochs: 1\n"
OPTS = "        optimization:\n          optimizers:\n"
SGD_M = "        optimization:\n          optimizers: {m: {type: SGD, lr: 0.1}}\n"

STEP_CASES = {
    "unknown key, did you mean": (
        "      - name: s\n        n_epoch: 3  # <-\n",
        "steps.0.n_epoch",
        "did you mean n_epochs?",
    ),
    "wrong type": (
        "      - name: s\n        n_epochs: 2\n        batch_size: eight  # <-\n",
        "steps.0.batch_size",
        "valid integer",
    ),
    "explicit null is not unset": (
        "      - name: s\n        n_epochs: 2\n        batch_size: null  # <-\n",
        "steps.0.batch_size",
        "valid integer",
    ),
    "unknown step dataset": (
        "      - name: s\n        dataset: c  # <-\n        n_epochs: 1\n",
        "steps.0.dataset",
        "names no dataset: 'c'",
    ),
    "unknown validation dataset": (
        "      - name: s\n        n_epochs: 1\n        validation: {dataset: vall, every: 10ba}  # <-\n",
        "steps.0.validation.dataset",
        "names no dataset: 'vall'",
    ),
    "duration not > 0": ("      - name: s\n        duration: 0ba  # <-\n", "steps.0.duration", "must be > 0"),
    "n_epochs not > 0": (
        "      - name: s\n        n_epochs: 0  # <-\n",
        "steps.0.n_epochs",
        "greater than 0",
    ),
    "cadence not > 0": (
        "      - name: s\n        n_epochs: 1\n        checkpoint_every: -5ba  # <-\n",
        "steps.0.checkpoint_every",
        "not a duration",
    ),
    "check_every unit": (
        S1 + "        transition_on: {check_every: 10xx}  # <-\n",
        "steps.0.transition_on.check_every",
        "not a duration",
    ),
    "max_epochs above the length": (
        "      - name: s\n        n_epochs: 10\n        transition_on: {mode: loss_threshold, metric: l, "
        "threshold: 0.1, max_epochs: 50}  # <-\n",
        "steps.0.transition_on.max_epochs",
        "is above the step's length",
    ),
    "max_epochs below the length": (
        "      - name: s\n        n_epochs: 10\n        transition_on: {max_epochs: 3}  # <-\n",
        "steps.0.transition_on.max_epochs",
        "is below the step's length",
    ),
    "no length": ("      - name: s  # <-\n        train: [vae]\n", "steps.0.name", "has no length"),
    "length twice": (
        "      - name: s\n        n_epochs: 1\n        max_steps: 5  # <-\n",
        "steps.0.max_steps",
        "given twice",
    ),
    "unknown optimizer type": (
        S1 + OPTS + "            m: {type: Adamw, lr: 0.1}  # <-\n",
        "steps.0.optimization.optimizers.m.type",
        "did you mean AdamW?",
    ),
    "unknown optimizer kwarg": (
        S1 + OPTS + "            m:\n              type: AdamW\n              lrr: 0.1  # <-\n",
        "steps.0.optimization.optimizers.m.lrr",
        "AdamW takes no argument 'lrr' (did you mean lr?)",
    ),
    "optimizer kwarg value refused": (
        S1 + OPTS + "            m: {type: SGD, lr: -1.0}  # <-\n",
        "steps.0.optimization.optimizers.m.type",
        "SGD refuses these arguments",
    ),
    "unknown scheduler type": (
        S1 + SGD_M + "          schedulers:\n            m: {type: CosineLR}  # <-\n",
        "steps.0.optimization.schedulers.m.type",
        "not a torch.optim.lr_scheduler scheduler",
    ),
    "scheduler kwarg unknown": (
        S1 + SGD_M + "          schedulers:\n            m:\n              type: CosineAnnealingLR\n"
        "              Tmax: auto  # <-\n",
        "steps.0.optimization.schedulers.m.Tmax",
        "did you mean T_max?",
    ),
    "scheduler argument missing": (
        S1 + SGD_M + "          schedulers:\n            m: {type: StepLR}  # <-\n",
        "steps.0.optimization.schedulers.m.type",
        "StepLR needs argument 'step_size'",
    ),
    "auto where it means nothing": (
        S1
        + SGD_M
        + "          schedulers:\n            m:\n              type: StepLR\n"
        + "              step_size: auto  # <-\n",
        "steps.0.optimization.schedulers.m.step_size",
        "auto is only understood for",
    ),
    "scheduler of no optimizer": (
        S1 + SGD_M + "          schedulers:\n            n: {type: CosineAnnealingLR, T_max: auto}  # <-\n",
        "steps.0.optimization.schedulers.n",
        "schedules no optimizer of this step",
    ),
    "frozen and trained": (
        S1 + "        freeze: [enc]\n"
        "        optimization:\n          optimizers:\n"
        "            m:\n              type: SGD\n              lr: 0.1\n              params:\n"
        "                - enc  # <-\n",
        "steps.0.optimization.optimizers.m.params.0",
        "module 'enc' is frozen and trained by the same step",
    ),
    "a module in two optimizers (each would step it)": (
        S1 + "        optimization:\n          optimizers:\n"
        "            all: {type: SGD, lr: 0.1, params: [enc, dec]}\n"
        "            dec: {type: AdamW, lr: 0.1}  # <-\n",
        "steps.0.optimization.optimizers.dec",
        "module 'dec' is trained by optimizers 'all' and 'dec' of the same step",
    ),
    "frozen and unfrozen": (
        S1 + "        freeze: [enc]\n        unfreeze:\n          - enc  # <-\n",
        "steps.0.unfreeze.0",
        "frozen and trained",
    ),
    "duplicate step names": (
        "      - name: s\n        n_epochs: 1\n      - name: s  # <-\n        n_epochs: 1\n",
        "steps.1.name",
        "is also step 0's",
    ),
    "val metric without validation": (
        S1 + "        transition_on: {mode: plateau, metric: l, source: val}  # <-\n",
        "steps.0.transition_on.source",
        "no validation",
    ),
    "a rule's key without its mode (the default mode epoch ignores it)": (
        S1 + "        transition_on:\n          metric: loss\n          threshold: 0.1  # <-\n",
        "steps.0.transition_on.threshold",
        "threshold means nothing to mode epoch",
    ),
    "threshold mode without threshold": (
        S1 + "        transition_on: {mode: loss_threshold, metric: l}  # <-\n",
        "steps.0.transition_on.mode",
        "needs a threshold",
    ),
}


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_step_rule_names_path_and_line(tmp_path, case):
    step, path, message = STEP_CASES[case]
    text = HEAD + step
    errors = _errors(tmp_path, text)
    hits = [e for e in errors if f"training.pipeline.{path}:" in e.what and message in e.what]
    assert hits, [e.line() for e in errors]
    assert hits[0].where == f"{tmp_path / 'p.yaml'}:{_marked_line(text)}"


DATASET_CASES = {
    "unknown dataset type": (
        "      c: {type: lokal, path: x}  # <-\n",
        "datasets.c.type",
        "type must be one of",
    ),
    "required key per type (local)": (
        "      c: {type: local, image_folder: /x}  # <-\n",
        "datasets.c.captions_file",
        "required key is missing",
    ),
    "required key per type (webdataset)": (
        "      c: {type: webdataset}  # <-\n",
        "datasets.c.webdataset_url",
        "required key is missing",
    ),
    "true/false for a number": (
        "      c:\n        type: prep\n        path: /x\n        batch_size: true  # <-\n",
        "datasets.c.batch_size",
        "expected a number, not true/false",
    ),
    "unknown dataset key": (
        "      c:\n        type: prep\n        path: /x\n        batchsize: 3  # <-\n",
        "datasets.c.batchsize",
        "did you mean batch_size?",
    ),
    "blend names unknown dataset": (
        "      c:\n        type: blend\n        sources:\n          - {dataset: a}\n"
        "          - {dataset: zz}  # <-\n",
        "datasets.c.sources.1.dataset",
        "names no dataset: 'zz'",
    ),
    "mix names unknown dataset": (
        "      c:\n        type: mix\n        sources:\n          - {dataset: bb, weight: 2}  # <-\n",
        "datasets.c.sources.0.dataset",
        "names no dataset: 'bb' (did you mean b?)",
    ),
    "concat names unknown dataset": (
        "      c:\n        type: concat\n        datasets:\n          - a\n          - q  # <-\n",
        "datasets.c.datasets.1",
        "names no dataset: 'q'",
    ),
    "cycle": (
        "      c: {type: blend, sources: [{dataset: d}]}  # <-\n      d: {type: concat, datasets: [a, c]}\n",
        "datasets.c",
        "cycle: c -> d -> c",
    ),
    "self cycle": ("      c: {type: concat, datasets: [a, c]}  # <-\n", "datasets.c", "cycle: c -> c"),
    "weight not > 0": (
        "      c:\n        type: blend\n        sources:\n          - {dataset: a, weight: 0}  # <-\n",
        "datasets.c.sources.0.weight",
        "greater than 0",
    ),
    "pipe without allow_pipe": (
        "      c: {type: webdataset, webdataset_url: 'pipe:cat x.tar'}  # <-\n",
        "datasets.c.webdataset_url",
        "off by default",
    ),
    "token on a source that sends none": (
        "      c:\n        type: webdataset\n        webdataset_url: /data/x-{0..3}.tar\n"
        "        webdataset_token: hf_abc  # <-\n",
        "datasets.c.webdataset_token",
        "only to http(s)://",
    ),
    "transform not importable": (
        "      c:\n        type: prep\n        path: /x\n        transform: no_such_module:fn  # <-\n",
        "datasets.c.transform",
        "cannot import no_such_module",
    ),
}


@pytest.mark.parametrize("case", list(DATASET_CASES))
def test_dataset_rule_names_path_and_line(tmp_path, case):
    dataset, path, message = DATASET_CASES[case]
    text = (
        HEAD.replace("    default_dataset", dataset + "    default_dataset")
        + "      - name: s\n        n_epochs: 1\n"
    )
    errors = _errors(tmp_path, text)
    hits = [e for e in errors if f"training.pipeline.{path}:" in e.what and message in e.what]
    assert hits, [e.line() for e in errors]
    assert hits[0].where == f"{tmp_path / 'p.yaml'}:{_marked_line(text)}"


def test_default_dataset_must_exist(tmp_path):
    text = (
        HEAD.replace("default_dataset: a", "default_dataset: ab  # <-")
        + "      - name: s\n        n_epochs: 1\n"
    )
    [err] = _errors(tmp_path, text)
    assert "training.pipeline.default_dataset: names no dataset: 'ab'" in err.what
    assert err.where.endswith(f":{_marked_line(text)}")


def test_step_without_dataset_and_default_names_the_step(tmp_path):
    text = HEAD.replace("    default_dataset: a\n", "") + "      - name: warmup  # <-\n        n_epochs: 1\n"
    [err] = _errors(tmp_path, text)
    assert "step 'warmup' has no dataset and the pipeline has no default_dataset" in err.what
    assert err.where.endswith(f":{_marked_line(text)}")


DECLARED = """\
    modules: [enc, dec, te]
    trainers: {vae: [vae_loss, kl], flow: [flow_loss]}
"""

DECLARED_CASES = {
    "params naming no module": (
        S1
        + OPTS
        + "            vae:\n              type: SGD\n              lr: 0.1\n"
        + "              params: [enc, decc]  # <-\n",
        "steps.0.optimization.optimizers.vae.params.1",
        "names no module: 'decc' (did you mean dec?)",
    ),
    "optimizer without params and no such module": (
        S1 + OPTS + "            vae: {type: SGD, lr: 0.1}  # <-\n",
        "steps.0.optimization.optimizers.vae",
        "has no params",
    ),
    "freeze naming no module": (
        "      - name: s\n        n_epochs: 1\n        freeze:\n          - tee  # <-\n",
        "steps.0.freeze.0",
        "names no module: 'tee'",
    ),
    "unknown trainer": (
        "      - name: s\n        n_epochs: 1\n        train: [vea]  # <-\n",
        "steps.0.train",
        "trainer 'vea' is not declared (did you mean vae?)",
    ),
    "metric no trainer of the step declares": (
        "      - name: s\n        n_epochs: 5\n        train: [vae]\n        transition_on:\n"
        "          mode: loss_threshold\n          metric: flow_loss  # <-\n          threshold: 0.1\n",
        "steps.0.transition_on.metric",
        "no trainer of this step reports 'flow_loss'",
    ),
    "plateau scheduler watching a metric no trainer reports": (
        "      - name: s\n        n_epochs: 5\n        train: [vae]\n        optimization:\n"
        "          optimizers: {enc: {type: SGD, lr: 0.1}}\n          schedulers:\n"
        "            enc: {type: ReduceLROnPlateau, monitor: vae_los}  # <-\n",
        "steps.0.optimization.schedulers.enc.monitor",
        "no trainer of this step reports 'vae_los' (did you mean vae_loss?)",
    ),
    "FluxFlow alias selects the trainer": (
        "      - name: s\n        n_epochs: 5\n        train_diff: true\n        transition_on:\n"
        "          mode: plateau\n          metric: vae_loss  # <-\n",
        "steps.0.transition_on.metric",
        "they report: flow_loss",
    ),
}


@pytest.mark.parametrize("case", list(DECLARED_CASES))
def test_declared_modules_and_trainers_rules(tmp_path, case):
    step, path, message = DECLARED_CASES[case]
    text = HEAD.replace("    steps:\n", DECLARED + "    steps:\n") + step
    errors = _errors(tmp_path, text)
    hits = [e for e in errors if f"training.pipeline.{path}:" in e.what and message in e.what]
    assert hits, [e.line() for e in errors]
    assert hits[0].where == f"{tmp_path / 'p.yaml'}:{_marked_line(text)}"


def test_caller_declarations_replace_the_yaml_ones(tmp_path):
    text = HEAD + S1 + "        freeze: [enc]\n"
    (tmp_path / "p.yaml").write_text(text)
    assert parse_pipeline_config(tmp_path / "p.yaml").steps[0].freeze == ["enc"]  # nothing declared: no check
    errors = _errors(tmp_path, text, modules=["encoder"])
    assert "names no module: 'enc'" in errors[0].what


def test_every_problem_reported_at_once(tmp_path):
    text = HEAD.replace("      b: {type: prep, path: /data/b}\n", "      b: {type: prep}\n") + (
        "      - name: s\n        dataset: nope\n        n_epochs: 0\n"
        "      - name: t\n        duration: 5xx\n        optimization: {optimizers: {m: {type: Adamm}}}\n"
    )
    errors = _errors(tmp_path, text)
    joined = "\n".join(e.what for e in errors)
    for needle in ("datasets.b.path", "steps.0.n_epochs", "steps.1.duration"):
        assert needle in joined, joined
    assert len(errors) == 3  # step 0's bad dataset reference is not checked: the step did not parse


def test_dict_input_and_pipeline_section_alone():
    cfg = parse_pipeline_config(
        {
            "datasets": {"a": {"type": "prep", "path": "/x"}},
            "steps": [{"name": "s", "dataset": "a", "train_vae": True, "n_epochs": 1}],
        }
    )
    assert cfg.steps[0].trainers == ["vae"]
    with pytest.raises(PrepErrorGroup) as err:
        parse_pipeline_config({"training": {"pipeline": {"steps": [{"name": "s", "n_epochs": 1}]}}})
    assert err.value.errors[0].what.startswith("training.pipeline.steps.0.name:")


def test_set_override_and_env_interpolation(tmp_path, monkeypatch):
    monkeypatch.setenv("PIPE_EPOCHS", "7")
    text = HEAD + "      - name: s\n        n_epochs: ${env:PIPE_EPOCHS}\n"
    (tmp_path / "p.yaml").write_text(text)
    assert parse_pipeline_config(tmp_path / "p.yaml").steps[0].n_epochs == 7
    monkeypatch.setenv("PIPE_EPOCHS", "seven")
    errors = _errors(tmp_path, text)
    assert "steps.0.n_epochs" in errors[0].what and errors[0].where.endswith(":9")
    cfg = parse_pipeline_config(tmp_path / "p.yaml", overrides=["training.pipeline.steps.0.n_epochs=3"])
    assert cfg.steps[0].n_epochs == 3
    text = (
        HEAD
        + "      - name: s\n        dataset: ${training.pipeline.default_dataset}\n        duration: 3ep\n"
    )
    (tmp_path / "p.yaml").write_text(text)
    cfg = parse_pipeline_config(tmp_path / "p.yaml")
    assert cfg.steps[0].dataset == "a" and str(cfg.steps[0].duration) == "3ep"


def test_a_bad_set_value_is_placed_at_the_set(tmp_path):
    text = HEAD + "      - name: s\n        n_epochs: 2\n"
    errors = _errors(tmp_path, text, overrides=["training.pipeline.steps.0.n_epochs=zero"])
    assert errors[0].where == "--set" and "training.pipeline.steps.0.n_epochs:" in errors[0].what


def test_a_key_of_several_types_is_one_error_named_by_its_key(tmp_path):
    """`image_size: int | [H, W]`, `limit_val_batches: count | fraction`: pydantic tries each type and
    names the member it tried after the key; the user gets one line per key, named as written."""
    text = HEAD.replace(
        "    default_dataset", "      c: {type: prep, path: /x, image_size: 0}\n    default_dataset"
    ) + "      - name: s\n        n_epochs: 1\n        validation: {dataset: a, limit_val_batches: -1}\n"
    errors = _errors(tmp_path, text)
    keys = [e.what.split(":")[0] for e in errors]
    assert keys == [
        "training.pipeline.datasets.c.image_size",
        "training.pipeline.steps.0.validation.limit_val_batches",
    ], [e.line() for e in errors]
    assert "greater than 0; or Input should be a valid list (got 0)" in errors[0].what
    assert errors[0].where.endswith("p.yaml:6") and errors[1].where.endswith("p.yaml:11")


BLEND_OF_A = "      c: {type: blend, sources: [{dataset: a}]}\n"


def test_a_broken_dataset_is_reported_once_not_again_by_every_reference(tmp_path):
    """A dataset with its own error still exists: the steps, blends and default_dataset that name it are
    not told it is missing (which sent the user to look for a name that was there)."""
    text = (
        HEAD.replace("a: {type: prep, path: /data/a}", "a: {type: prep, path: /data/a, batch_size: 0}")
        .replace("    default_dataset", BLEND_OF_A + "    default_dataset")
        + "      - name: s\n        dataset: a\n        n_epochs: 1\n        validation: {dataset: a}\n"
    )
    errors = _errors(tmp_path, text)
    assert [e.what.split(":")[0] for e in errors] == ["training.pipeline.datasets.a.batch_size"], [
        e.line() for e in errors
    ]


def test_did_you_mean_suggests_only_keys_of_that_place(tmp_path):
    """A step's key written on a dataset is not met with 'did you mean <the same key>?', and a typo in
    a nested section is matched against that section's keys."""
    text = HEAD.replace("a: {type: prep, path: /data/a}", "a: {type: prep, path: /data/a, n_epochs: 2}") + (
        "      - name: s\n        n_epochs: 1\n        transition_on: {max_epoch: 1}\n"
    )
    errors = {e.what.split(":")[0]: e.what for e in _errors(tmp_path, text)}
    assert "did you mean" not in errors["training.pipeline.datasets.a.n_epochs"]
    assert "did you mean max_epochs?" in errors["training.pipeline.steps.0.transition_on.max_epoch"]


def test_a_set_without_the_pipeline_prefix_in_a_full_config_is_refused(tmp_path):
    """In a file with the pipeline under training.pipeline, `--set steps.0.n_epochs=3` made a new
    top-level `steps` that nothing reads: the run kept n_epochs 2 and said nothing."""
    (tmp_path / "p.yaml").write_text(HEAD + "      - name: s\n        n_epochs: 2\n")
    with pytest.raises(PrepError) as err:
        parse_pipeline_config(tmp_path / "p.yaml", overrides=["steps.0.n_epochs=3"])
    assert err.value.where == "--set steps.0.n_epochs" and "training.pipeline" in err.value.what
    assert err.value.fix == "write --set training.pipeline.steps.0.n_epochs=3"
