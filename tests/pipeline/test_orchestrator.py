"""The orchestrator on CPU with tiny real torch models and real shards: freezing, transitions, lengths,
epochs, exact resume at many points (in-process), config changes on resume, unsafe checkpoints."""

import copy
import json
import pickle
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from prep.errors import PrepError, PrepErrorGroup
from prep.pipeline import checkpoint as ckpt
from prep.pipeline import parse_pipeline_config
from prep.pipeline.orchestrator import TrainingPipelineOrchestrator
from prep.pipeline.plan import make_plan
from prep.testing.loader_data import make_shards
from prep.testing.pipeline_data import RegressionTrainer, tiny_modules

SIZES = [7, 6, 8]  # 21 samples: 6 batches of 4 per epoch (the last one short)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("orch")
    make_shards(root / "d", SIZES, image_size=8, distinct_images=1)
    make_shards(root / "v", [5], image_size=8, distinct_images=1, prefix="val")
    return root


def _config(root: Path, steps: list[dict], **extra) -> object:
    return parse_pipeline_config(
        {
            "datasets": {
                "d": {"type": "prep", "path": str(root / "d"), "decode": "raw", "batch_size": 4},
                "v": {"type": "prep", "path": str(root / "v"), "decode": "raw", "shuffle": False},
            },
            "default_dataset": "d",
            "defaults": {"workers": 0, "seed": 7},
            "steps": steps,
            **extra,
        }
    )


OPT_DEC = {"optimizers": {"dec": {"type": "AdamW", "lr": 0.01}}}
OPT_BOTH = {"optimizers": {"all": {"type": "AdamW", "lr": 0.01, "params": ["enc", "dec"]}}}
TWO_STEPS = [
    {
        "name": "dec_only",
        "n_epochs": 2,
        "train": ["reg"],
        "freeze": ["enc"],
        "optimization": {**OPT_DEC, "schedulers": {"dec": {"type": "CosineAnnealingLR", "T_max": "auto"}}},
        "validation": {"dataset": "v", "every": "4ba"},
        "checkpoint_every": "3ba",
    },
    {
        "name": "both",
        "max_steps": 9,
        "train": ["reg"],
        "unfreeze": ["enc"],
        "optimization": OPT_BOTH,
        "carry_optimizer": True,
        "ema": {"decay": 0.9},
        "checkpoint_every": "2ba",
    },
]


def _run(cfg, folder, **kw):
    modules, trainer = tiny_modules(0), RegressionTrainer()
    run_kw = {"max_batches": kw.pop("max_batches")} if "max_batches" in kw else {}
    orch = TrainingPipelineOrchestrator(cfg, modules, {"reg": trainer}, folder, progress=False, **kw)
    orch.run(**run_kw)
    return orch, modules, trainer


def _weights(modules) -> dict[str, torch.Tensor]:
    return {f"{m}.{k}": v.clone() for m, mod in modules.items() for k, v in mod.state_dict().items()}


def _step_end(folder: Path, index: int) -> dict:
    [path] = folder.glob(f"step-{index:03d}-*.pt")
    return ckpt.load(path)


def test_freeze_is_bitwise_and_unfreeze_trains(data, tmp_path):
    cfg = _config(data, TWO_STEPS)
    initial = _weights(tiny_modules(0))
    orch, modules, _ = _run(cfg, tmp_path / "ck")
    after0 = _step_end(tmp_path / "ck", 0)["modules"]
    for k, v in after0["enc"].items():
        assert torch.equal(v, initial[f"enc.{k}"])  # frozen: not one bit moved
    assert not torch.equal(after0["dec"]["weight"], initial["dec.weight"])
    assert not torch.equal(modules["enc"].weight, initial["enc.weight"])  # unfrozen in step 2: trained
    assert all(p.requires_grad for p in modules["enc"].parameters()) and modules["enc"].training
    assert [s.reason for s in orch.summaries] == ["epoch: n_epochs 2 done", "length: 9 batches done"]
    ema = _step_end(tmp_path / "ck", 1)["ema"]
    assert set(ema) == {"enc", "dec"} and not torch.equal(ema["dec"]["module.weight"], modules["dec"].weight)


def test_lengths_epochs_and_keys(data, tmp_path):
    cfg = _config(data, TWO_STEPS)
    orch, _, trainer = _run(cfg, tmp_path / "ck")
    keys = trainer.keys
    assert len(keys) == 2 * 6 + 9  # n_epochs 2 of 6 batches, then max_steps 9
    epoch1, epoch2 = keys[:6], keys[6:12]
    flat1, flat2 = sorted(k for b in epoch1 for k in b), sorted(k for b in epoch2 for k in b)
    assert len(flat1) == 21 and flat1 == flat2  # epoch 2 has batches: every sample again
    assert [k for b in epoch1 for k in b] != [k for b in epoch2 for k in b]  # reshuffled by set_epoch
    s0, s1 = orch.summaries
    assert (s0.batches, s0.samples, s0.epochs) == (12, 42, 2.0) and (s1.batches, s1.epochs) == (9, 1.5)
    assert orch.state.global_batches == 21 and orch.state.samples_seen == 42 + 21 + 12


def test_loss_threshold_moves_on_early_and_a_cap_stops_it(data, tmp_path):
    early = {
        "name": "early",
        "train": ["reg"],
        "optimization": OPT_DEC,
        "transition_on": {
            "mode": "loss_threshold",
            "metric": "loss",
            "threshold": 100.0,
            "patience": 3,
            "check_every": "2ba",
            "max_epochs": 5,
        },
    }
    never = {**early, "name": "never", "transition_on": {**early["transition_on"], "threshold": -1.0}}
    orch, _, trainer = _run(_config(data, [early, never]), tmp_path / "ck")
    s0, s1 = orch.summaries
    assert s0.batches == 6 and s0.reason.startswith("loss_threshold: train loss")  # 3 checks, 2 batches apart
    assert s1.batches == 30 and s1.reason == "epoch: transition_on.max_epochs 5 done"  # the cap, named
    assert len(trainer.keys) == 36
    history = _step_end(tmp_path / "ck", 1)
    assert "loss" in __import__("json").loads(history["meta"])["metrics"]["recent"]


def test_plateau_and_validation_metric(data, tmp_path):
    step = {
        "name": "p",
        "n_epochs": 6,
        "train": ["reg"],
        "optimization": {
            "optimizers": {"dec": {"type": "SGD", "lr": 0.0}}
        },  # lr 0: the validation loss cannot improve
        "validation": {"dataset": "v", "every": "2ba"},
        "transition_on": {
            "mode": "plateau",
            "metric": "loss",
            "source": "val",
            "patience": 2,
            "check_every": "2ba",
            "max_epochs": 6,
        },
    }
    orch, _, _ = _run(_config(data, [step]), tmp_path / "ck")
    [s] = orch.summaries
    assert s.batches == 6 and s.reason.startswith("plateau: val loss did not improve")


def _resume_matches(cfg, folder: Path, stops: list[int], ref_weights, ref_keys, **resume_kw) -> None:
    trained = 0
    for stop in stops:
        _run(cfg, folder, max_batches=stop - trained, **resume_kw)
        trained = stop
    _, modules, trainer = _run(cfg, folder, **resume_kw)
    got = _weights(modules)
    assert all(torch.equal(got[k], ref_weights[k]) for k in ref_weights)
    assert trainer.keys == ref_keys


def test_resume_anywhere_is_exact(data, tmp_path):
    """Stopped mid-epoch, at an epoch end, right after validation, at a step boundary, after the
    unfreeze, then resumed each time in a fresh orchestrator: bitwise the uninterrupted result."""
    cfg = _config(data, TWO_STEPS)
    _, modules, trainer = _run(cfg, tmp_path / "ref")
    ref_weights, ref_keys = _weights(modules), trainer.keys
    _resume_matches(cfg, tmp_path / "a", [1, 4, 6, 7, 12, 13, 17], ref_weights, ref_keys)


def test_resume_with_other_workers_chunks_and_accumulation(data, tmp_path):
    steps = [
        {
            "name": "chunked",
            "n_epochs": 2,
            "train": ["reg"],
            "optimization": OPT_DEC,
            "grad_accumulation": 2,
            "validation": {"dataset": "v", "train_chunk_size": 4, "val_chunk_size": 2},
            "checkpoint_every": "1ba",
        }
    ]
    cfg = _config(data, steps)
    _, modules, trainer = _run(cfg, tmp_path / "ref")
    ref = _weights(modules)
    cfg1 = parse_pipeline_config(
        {
            **cfg.model_dump(include={"default_dataset"}),
            "datasets": {k: v.model_dump(exclude_none=True) for k, v in cfg.datasets.items()},
            "defaults": {"workers": 1, "seed": 7},
            "steps": steps,
        }
    )
    _resume_matches(cfg1, tmp_path / "a", [3, 5, 9], ref, trainer.keys)


def test_changed_current_step_refused_later_step_accepted(data, tmp_path):
    cfg = _config(data, TWO_STEPS)
    _run(cfg, tmp_path / "ck", max_batches=5)  # stopped inside step 1
    later = copy.deepcopy(TWO_STEPS)
    later[1]["optimization"] = {"optimizers": {"all": {"type": "SGD", "lr": 0.1, "params": ["enc", "dec"]}}}
    later.append({"name": "extra", "max_steps": 2, "train": ["reg"], "optimization": OPT_DEC})
    current = copy.deepcopy(TWO_STEPS)
    current[0]["optimization"]["optimizers"]["dec"]["lr"] = 0.5
    with pytest.raises(PrepError) as err:
        _run(_config(data, current), tmp_path / "ck")
    assert (
        "current step 0 (dec_only)" in err.value.what and "optimization.optimizers.dec.lr" in err.value.what
    )
    assert "--allow-config-change" in err.value.fix
    bigger = copy.deepcopy(TWO_STEPS)
    bigger[0]["batch_size"] = 5
    with pytest.raises(PrepError, match=r"batch_size\.d: 4 -> 5"):
        _run(_config(data, bigger), tmp_path / "ck")
    orch, _, _ = _run(_config(data, later), tmp_path / "ck")  # steps not yet started may change
    assert [s.name for s in orch.summaries] == ["dec_only", "both", "extra"]
    with pytest.raises(PrepError, match="finished step 0"):
        _run(_config(data, current), tmp_path / "ck")
    orch, _, _ = _run(_config(data, current), tmp_path / "ck", allow_config_change=True)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_crafted_pickle_checkpoint_refused_without_running_it(data, tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (marker,))

    folder = tmp_path / "ck"
    folder.mkdir()
    with open(folder / ckpt.regular_name(999), "wb") as f:
        pickle.dump({"format": ckpt.FORMAT, "meta": "{}", "x": Evil()}, f)
    with pytest.raises(PrepError) as err:
        _run(_config(data, TWO_STEPS), folder)
    assert "not a safe pipeline checkpoint" in err.value.what and err.value.where.endswith(
        "ckpt-000000000999.pt"
    )
    assert not marker.exists()
    torch.save({"format": ckpt.FORMAT, "meta": "{}", "x": Evil()}, folder / ckpt.regular_name(999))
    with pytest.raises(PrepError, match="not a safe pipeline checkpoint"):
        _run(_config(data, TWO_STEPS), folder, resume=folder / ckpt.regular_name(999))
    assert not marker.exists()


def test_loader_start_leaves_torch_rng_alone(data):
    from prep.pipeline.data import build_loader

    cfg = _config(data, TWO_STEPS)
    loader, _, _ = build_loader(cfg, "d", step=cfg.steps[0])
    torch.manual_seed(3)
    expected = torch.rand(3)
    torch.manual_seed(3)
    assert len(list(loader)) == 6  # the pipeline's loader, iterated as the orchestrator does
    assert torch.equal(torch.rand(3), expected)


def test_trainers_and_modules_checked_against_what_was_passed(data, tmp_path):
    cfg = _config(
        data,
        [
            {
                "name": "s",
                "max_steps": 1,
                "train": ["reg", "gan"],
                "freeze": ["encoder"],
                "optimization": OPT_DEC,
            }
        ],
    )
    with pytest.raises(PrepErrorGroup) as err:
        TrainingPipelineOrchestrator(
            cfg, tiny_modules(0), {"reg": RegressionTrainer()}, tmp_path, progress=False
        )
    text = " ".join(e.what for e in err.value.errors)
    assert "trainer 'gan' is not declared" in text and "names no module: 'encoder'" in text


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_with_clipping_and_accumulation_trains(data, tmp_path, precision):
    step = {
        "name": "amp",
        "max_steps": 6,
        "train": ["reg"],
        "precision": precision,
        "grad_clip_norm": 0.5,
        "grad_accumulation": 3,
        "optimization": OPT_BOTH,
    }
    before = _weights(tiny_modules(0))
    orch, modules, trainer = _run(_config(data, [step]), tmp_path / "ck")
    after = _weights(modules)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert not torch.equal(after["enc.weight"], before["enc.weight"])
    assert orch.state.optimizer_steps == 2 and len(trainer.keys) == 6


def test_ema_reset_policy_starts_a_new_average(data, tmp_path):
    steps = [
        {"name": "a", "max_steps": 4, "train": ["reg"], "optimization": OPT_DEC, "ema": {"decay": 0.5}},
        {
            "name": "b",
            "max_steps": 4,
            "train": ["reg"],
            "optimization": OPT_DEC,
            "ema": {"decay": 0.5, "policy": "reset"},
        },
    ]
    _run(_config(data, steps), tmp_path / "ck")
    a, b = _step_end(tmp_path / "ck", 0)["ema"]["dec"], _step_end(tmp_path / "ck", 1)["ema"]["dec"]
    assert int(a["n_averaged"]) == 4 and int(b["n_averaged"]) == 4  # reset: counted from the new step
    steps[1]["ema"]["policy"] = "keep"
    _run(_config(data, steps), tmp_path / "keep")
    assert int(_step_end(tmp_path / "keep", 1)["ema"]["dec"]["n_averaged"]) == 8


def test_validation_every_epoch_and_history_kept_per_step(data, tmp_path):
    steps = [
        {
            "name": "a",
            "n_epochs": 3,
            "train": ["reg"],
            "optimization": OPT_DEC,
            "validation": {"dataset": "v", "every": "1ep"},
        },
        {
            "name": "b",
            "n_epochs": 2,
            "train": ["reg"],
            "optimization": OPT_DEC,
            "validation": {"dataset": "v", "every": "2ep"},
        },
    ]
    orch, _, _ = _run(_config(data, steps), tmp_path / "ck")
    a, b = orch.state.completed
    assert [h["batch"] for h in a["history"] if h["kind"] == "val"] == [6, 12, 18]
    assert [h["batch"] for h in b["history"] if h["kind"] == "val"] == [12]
    assert a["val_metrics"]["loss"] > 0 and [h["kind"] for h in a["history"]].count("epoch") == 3


def test_carry_optimizer_keeps_the_state_of_parameters_that_stay_trained(data, tmp_path):
    carried = copy.deepcopy(TWO_STEPS)  # step 1: AdamW on dec; step 2: AdamW on enc + dec, carry on
    _run(_config(data, carried), tmp_path / "carry", max_batches=13)
    end = _step_end(tmp_path / "carry", 0)
    assert set(end["carry"]) == {"dec.weight", "dec.bias"}
    assert end["carry"]["dec.weight"]["optimizer"] == "AdamW"
    assert int(end["carry"]["dec.weight"]["state"]["step"]) == 12
    _, with_carry, _ = _run(_config(data, carried), tmp_path / "carry")  # resumed inside step 2
    fresh = copy.deepcopy(TWO_STEPS)
    fresh[1]["carry_optimizer"] = False
    _, without, _ = _run(_config(data, fresh), tmp_path / "fresh")
    assert not torch.equal(with_carry["dec"].weight, without["dec"].weight)
    _, again, _ = _run(_config(data, carried), tmp_path / "uninterrupted")
    assert torch.equal(with_carry["dec"].weight, again["dec"].weight)  # the carry survives a resume
    _run(_config(data, carried), tmp_path / "edge", max_batches=12)  # stopped on step 1's last batch
    _, at_edge, _ = _run(_config(data, carried), tmp_path / "edge")
    assert torch.equal(at_edge["dec"].weight, again["dec"].weight)


def test_progress_and_summary_fit_80_columns_and_show_every_name_whole(data, tmp_path):
    """At 80 columns the steps' names, their reasons and every final metric (train and val) are shown
    whole, each metric on its own row, and no line is wider than 80."""
    from rich.console import Console

    console = Console(record=True, width=80, force_terminal=False)  # each bar as it ends
    cfg = _config(data, [{**TWO_STEPS[0], "name": "a_long_step_name"}, TWO_STEPS[1]])
    modules, trainer = tiny_modules(0), RegressionTrainer()
    orch = TrainingPipelineOrchestrator(cfg, modules, {"reg": trainer}, tmp_path / "ck", console=console)
    orch.run()
    orch.print_summary()
    text = console.export_text()
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80
    assert any(line.startswith("step 1/2 a_long_step_name") for line in lines)  # the bar's name whole
    for s in orch.summaries:
        assert s.name in text and s.reason.split(":")[0] in text
        shown = {**s.metrics, **{f"val/{k}": v for k, v in s.val_metrics.items()}}
        assert shown
        for k, v in shown.items():  # a row per metric: its name and value on one line
            assert any(k in line and f"{v:.4g}" in line for line in lines), k


def test_stop_after_on_a_step_end_trains_exactly_that_many(data, tmp_path):
    """`max_batches` that lands on a step's last batch stops there (the step-end checkpoint), without
    training a batch of the next step; the resumed run is the uninterrupted one."""
    steps = [
        {"name": "a", "max_steps": 5, "train": ["reg"], "freeze": ["enc"], "optimization": OPT_DEC},
        {"name": "b", "max_steps": 4, "train": ["reg"], "optimization": OPT_BOTH},
    ]
    cfg = _config(data, steps)
    _, modules, trainer = _run(cfg, tmp_path / "ref")
    orch, _, stopped = _run(cfg, tmp_path / "ck", max_batches=5)
    assert len(stopped.keys) == 5 and orch.state.global_batches == 5 and orch.state.step_index == 1
    _resume_matches(cfg, tmp_path / "ck", [], _weights(modules), trainer.keys)


def test_gradients_of_a_step_never_reach_the_next_one(data, tmp_path):
    """A module left trainable but stepped by no optimizer (enc in step a) gathers gradients; they must
    not join its first update in step b: a run resumed at the step end (no gradients saved) and the
    uninterrupted run are bitwise the same."""
    steps = [
        {"name": "a", "max_steps": 5, "train": ["reg"], "optimization": OPT_DEC},
        {"name": "b", "max_steps": 4, "train": ["reg"], "optimization": OPT_BOTH},
    ]
    cfg = _config(data, steps)
    _, modules, trainer = _run(cfg, tmp_path / "ref")
    _resume_matches(cfg, tmp_path / "ck", [3, 5, 6], _weights(modules), trainer.keys)


def test_a_run_starting_behind_the_folders_checkpoints_is_refused(data, tmp_path):
    """A fresh run (--resume never) or a rewind (--resume an older checkpoint) in a folder holding
    checkpoints past its start would have its own checkpoints pruned as the oldest, and the next
    --resume auto would pick the abandoned run: refused, naming the folder and the checkpoints."""
    steps = [{"name": "a", "max_steps": 6, "train": ["reg"], "optimization": OPT_DEC, "checkpoint_every": 1}]
    cfg = _config(data, steps)
    _, ref, _ = _run(cfg, tmp_path / "ck")
    before = sorted(p.name for p in (tmp_path / "ck").iterdir())
    for resume, start in (("never", 0), (tmp_path / "ck" / ckpt.regular_name(4), 4)):
        with pytest.raises(PrepError) as err:
            _run(cfg, tmp_path / "ck", resume=resume, max_batches=1)
        assert f"checkpoint(s) past batch {start}, where this run starts" in err.value.what
        assert err.value.where == str(tmp_path / "ck") and "--checkpoint-dir" in err.value.fix
        assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == before
    for name in before:  # the rewind, once the later checkpoints are moved away
        if name != ckpt.regular_name(4):
            (tmp_path / "ck" / name).rename(tmp_path / name)
    _run(cfg, tmp_path / "ck", resume=tmp_path / "ck" / ckpt.regular_name(4), max_batches=1)
    _, modules, _ = _run(cfg, tmp_path / "ck")  # --resume auto continues the rewound run
    assert torch.equal(modules["dec"].weight, ref["dec"].weight)
    _, _, trainer = _run(cfg, tmp_path / "empty", resume="never")  # an empty or new folder is fine
    assert len(trainer.keys) == 6


class _Counting(RegressionTrainer):
    """Also records the learning rate each batch trained with, and counts validation batches."""

    def __init__(self) -> None:
        super().__init__()
        self.lrs: list[float] = []
        self.val_batches = 0

    def train_step(self, batch, ctx):
        self.lrs.append(ctx.optimizers["dec"].param_groups[0]["lr"])
        return super().train_step(batch, ctx)

    def val_step(self, batch, ctx):
        self.val_batches += 1
        return super().val_step(batch, ctx)


def test_batch_limits_above_the_epoch_are_the_epoch(data, tmp_path):
    """Lightning's convention: a limit above the epoch's batches is the whole epoch. T_max: auto is then
    the step's real length (the cosine reaches its end), and validation reads the set once."""
    step = {
        "name": "a",
        "n_epochs": 2,
        "train": ["reg"],
        "optimization": {**OPT_DEC, "schedulers": {"dec": {"type": "CosineAnnealingLR", "T_max": "auto"}}},
        "validation": {"dataset": "v", "every": "1ep", "limit_train_batches": 100, "limit_val_batches": 50},
    }
    trainer = _Counting()
    orch = TrainingPipelineOrchestrator(
        _config(data, [step]), tiny_modules(0), {"reg": trainer}, tmp_path / "ck", progress=False
    )
    orch.run()
    assert len(trainer.lrs) == 12
    assert trainer.lrs[6] == pytest.approx(0.005) and trainer.lrs[-1] < 0.001  # half-way, then near 0
    assert trainer.val_batches == 2 * 3  # 5 samples in batches of 2, once per epoch


def test_a_train_limit_of_no_batches_is_refused_by_its_key(data, tmp_path):
    step = {"name": "a", "n_epochs": 1, "train": ["reg"], "optimization": OPT_DEC}
    with pytest.raises(PrepErrorGroup, match=r"limit_train_batches: .*greater than 0"):
        _config(data, [{**step, "validation": {"dataset": "v", "limit_train_batches": 0}}])
    cfg = _config(data, [{**step, "validation": {"dataset": "v", "limit_train_batches": 0.1}}])
    [plan] = make_plan(cfg)
    assert any("limit_train_batches=0.1 leaves no batch of the epoch's 6" in p.line() for p in plan.problems)
    with pytest.raises(PrepError) as err:
        _run(cfg, tmp_path / "ck")
    assert "limit_train_batches=0.1 leaves no batch" in err.value.what
    assert err.value.fix.startswith("raise it")


def test_changed_trainer_options_of_a_started_step_refused(data, tmp_path):
    """`trainer_options` decide the loss (kl_weight, gan_weight...): a resume into a step whose trainers'
    options changed is refused like any other change of the step; other trainers' options may change."""
    opts = {"reg": {"weight": 1.0}}
    _run(_config(data, TWO_STEPS, trainer_options=opts), tmp_path / "ck", max_batches=5)
    with pytest.raises(PrepError, match=r"trainer_options\.reg\.weight: 1\.0 -> 2\.0"):
        _run(_config(data, TWO_STEPS, trainer_options={"reg": {"weight": 2.0}}), tmp_path / "ck")
    orch, _, _ = _run(_config(data, TWO_STEPS, trainer_options={**opts, "gan": {"x": 1}}), tmp_path / "ck")
    assert [s.name for s in orch.summaries] == ["dec_only", "both"]


def test_a_transition_checked_at_epoch_ends_of_a_step_without_one_is_a_problem(data):
    """Without check_every a rule is checked at epoch ends; a step of max_steps up to one epoch (6
    batches here) has none, so the rule could never fire: the plan says so. Longer, or with
    check_every, it is fine."""
    rule = {"mode": "loss_threshold", "metric": "loss", "threshold": 1.0}
    step = {"name": "a", "train": ["reg"], "optimization": OPT_DEC, "transition_on": rule}
    [short] = make_plan(_config(data, [{**step, "max_steps": 6}]))
    [problem] = [p.line() for p in short.problems]
    assert "steps.0.transition_on: loss_threshold is checked at epoch ends" in problem
    assert "ends after 6 batches, before its first epoch end (6 batches)" in problem
    assert "fix: set transition_on.check_every" in problem
    assert not make_plan(_config(data, [{**step, "max_steps": 7}]))[0].problems
    checked = {**step, "max_steps": 6, "transition_on": {**rule, "check_every": "2ba"}}
    assert not make_plan(_config(data, [checked]))[0].problems


def test_a_kept_ema_averages_with_the_new_steps_decay(data, tmp_path):
    """`policy: keep` carries the average, not the old decay: at decay ~0 the average is the weights,
    in a run resumed inside the step (the average rebuilt) and in the uninterrupted one alike."""
    steps = [
        {"name": "a", "max_steps": 4, "train": ["reg"], "optimization": OPT_DEC, "ema": {"decay": 0.999}},
        {
            "name": "b",
            "max_steps": 4,
            "train": ["reg"],
            "optimization": OPT_DEC,
            "ema": {"decay": 1e-9, "policy": "keep"},
        },
    ]
    cfg = _config(data, steps)
    for folder, stops in (("ref", []), ("resumed", [6])):
        for stop in stops:
            _run(cfg, tmp_path / folder, max_batches=stop)
        _, modules, _ = _run(cfg, tmp_path / folder)
        ema = _step_end(tmp_path / folder, 1)["ema"]["dec"]
        assert int(ema["n_averaged"]) == 8
        assert torch.allclose(ema["module.weight"], modules["dec"].weight, atol=1e-6), folder


def test_a_module_no_optimizer_trains_is_frozen_in_that_step_unless_unfrozen_there(data, tmp_path):
    """Steps whose optimizers train `dec` alone, `enc` in no `freeze`: frozen (requires_grad False, no
    gradient; eval() unless frozen_eval: false); `unfreeze: [enc]` keeps it trainable in its own step
    only; the plan says the same per step, and a resume inside a step sets the same flags."""
    steps = [
        {"name": "a", "max_steps": 3, "train": ["reg"], "optimization": OPT_DEC, "frozen_eval": False},
        {"name": "b", "max_steps": 3, "train": ["reg"], "optimization": OPT_DEC, "unfreeze": ["enc"]},
        {"name": "c", "max_steps": 2, "train": ["reg"], "optimization": OPT_DEC, "checkpoint_every": "1ba"},
    ]
    cfg = _config(data, steps, modules=["enc", "dec"])
    plans = make_plan(cfg, build=False)
    want = [(["dec"], ["enc"]), (["dec", "enc"], []), (["dec"], ["enc"])]
    assert [(p.trains, p.frozen) for p in plans] == want

    def run(folder: Path, stops: tuple[int | None, ...]) -> tuple[list[tuple], dict]:
        seen: list[tuple] = []
        for stop in stops:
            modules = tiny_modules(0)
            trainers = {"reg": RegressionTrainer()}
            orch = TrainingPipelineOrchestrator(cfg, modules, trainers, folder, progress=False)
            enc = modules["enc"]
            enc.register_forward_hook(lambda m, a, o, orch=orch: seen.append(
                (orch.state.step_index, m.training, m.weight.requires_grad, m.weight.grad is not None)))
            orch.run(**({"max_batches": stop} if stop else {}))
        return seen, modules

    seen, modules = run(tmp_path / "whole", (None,))
    unfrozen = [(1, True, True, False), (1, True, True, True), (1, True, True, True)]
    assert seen == [(0, True, False, False)] * 3 + unfrozen + [(2, False, False, False)] * 2
    assert torch.equal(modules["enc"].weight, tiny_modules(0)["enc"].weight)  # nothing stepped it
    resumed, _ = run(tmp_path / "split", (2, 5, None))  # inside a, inside c
    assert resumed == seen


def test_the_default_ema_averages_every_module_the_step_trains_unfrozen_ones_included(data, tmp_path):
    """With no `ema.modules`, the average covers `StepConfig.trained_modules`: the optimizers' modules
    and those `unfreeze` keeps trainable (a trainer's own updates), not the frozen rest."""
    steps = [
        {"name": "a", "max_steps": 2, "train": ["reg"], "optimization": OPT_DEC, "ema": {"decay": 0.9}},
        {"name": "b", "max_steps": 2, "train": ["reg"], "optimization": OPT_DEC, "unfreeze": ["enc"],
         "ema": {"decay": 0.9}},
    ]
    cfg = _config(data, steps, modules=["enc", "dec"])
    _run(cfg, tmp_path / "ck")
    assert set(_step_end(tmp_path / "ck", 0)["ema"]) == {"dec"}
    assert set(_step_end(tmp_path / "ck", 1)["ema"]) == {"dec", "enc"}


def test_a_step_that_trains_nothing_says_so_at_the_first_backward_naming_its_line(data, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(
        f"datasets:\n  d: {{type: prep, path: {data / 'd'}, decode: raw, batch_size: 4}}\n"
        "defaults: {workers: 0}\nsteps:\n"
        "  - name: first\n    dataset: d\n    max_steps: 1\n    train: [reg]\n"
        "    optimization: {optimizers: {dec: {type: SGD, lr: 0.1}}}\n"
        "  - name: idle\n    dataset: d\n    max_steps: 2\n    train: [reg]\n    freeze: [enc]\n"
    )
    with pytest.raises(PrepError) as err:
        _run(parse_pipeline_config(path), tmp_path / "ck")
    assert err.value.what == (
        "step 'idle': the loss needs no gradient: the step trains no module and every other module is frozen"
    )
    assert err.value.where == f"{path}:10" and "optimizer" in err.value.fix


def test_an_optimizer_without_trainable_parameters_is_named_at_its_line(data, tmp_path):
    """Modules come at run time, so validate cannot see it: the run names the optimizer's key and line."""
    path = tmp_path / "p.yaml"
    path.write_text(
        f"datasets:\n  d: {{type: prep, path: {data / 'd'}, decode: raw, batch_size: 4}}\n"
        "defaults: {workers: 0}\nsteps:\n  - name: s\n    dataset: d\n    max_steps: 2\n    train: [reg]\n"
        "    optimization:\n      optimizers:\n        dec: {type: SGD, lr: 0.1}\n"
    )
    modules = tiny_modules(0)
    modules["dec"].requires_grad_(False)  # e.g. a pretrained part the caller built frozen
    orch = TrainingPipelineOrchestrator(
        parse_pipeline_config(path), modules, {"reg": RegressionTrainer()}, tmp_path / "ck", progress=False
    )
    with pytest.raises(PrepError) as err:
        orch.run()
    assert err.value.where == f"{path}:11"
    assert err.value.what.startswith("steps.0.optimization.optimizers.dec: optimizer 'dec' has no trainable")


def test_samples_are_counted_in_the_batch_size(data, tmp_path):
    """21 samples in batches of 5 (the last one short: 4.2 on average, which rounded to 4): 20sp are 4
    batches, in the plan and in the run, and a 10sp checkpoint cadence is every 2 batches."""
    step = {"name": "a", "duration": "20sp", "batch_size": 5, "train": ["reg"], "optimization": OPT_DEC,
            "checkpoint_every": "10sp"}
    cfg = _config(data, [step])
    [plan] = make_plan(cfg)
    assert (plan.batches_per_epoch, plan.length.batches, plan.length.samples) == (5, 4, 20)
    _, _, trainer = _run(cfg, tmp_path / "ck")
    assert [len(k) for k in trainer.keys] == [5, 5, 5, 5]
    assert [p.name for p in (tmp_path / "ck").glob("ckpt-*")] == [ckpt.regular_name(2)]  # 4 ends the step


def test_a_validation_metric_counts_once_per_validation(data, tmp_path):
    """A rule on a validation metric checked more often than validation runs (check_every 1ba,
    validation every epoch) counts each validation once: it fired after one validation, 'not improving
    for 3 checks' on the same value. Here the plateau needs 3 validations after the best."""
    steps = [
        {
            "name": "a",
            "n_epochs": 8,
            "train": ["reg"],
            "optimization": OPT_DEC,
            "validation": {"dataset": "v", "every": "6ba"},
            "transition_on": {"mode": "plateau", "metric": "loss", "source": "val", "patience": 3,
                              "min_delta": 100.0, "check_every": "1ba"},  # no validation improves
        }
    ]
    orch, _, _ = _run(_config(data, steps), tmp_path / "ck")
    [summary] = orch.summaries
    vals = [h["batch"] for h in orch.state.completed[0]["history"] if h["kind"] == "val"]
    assert summary.reason.startswith("plateau") and vals == [6, 12, 18, 24] and summary.batches == 24


def test_a_plateau_scheduler_on_a_validation_metric_steps_once_per_validation(data, tmp_path):
    """ReduceLROnPlateau watching a validation metric (checks every batch, validation every epoch): the
    same value was fed at every check, and the rate was cut at every batch after a validation."""
    sched = {"type": "ReduceLROnPlateau", "monitor": "loss", "patience": 0, "factor": 0.5, "threshold": 10.0}
    step = {
        "name": "a",
        "n_epochs": 2,
        "train": ["reg"],
        "optimization": {**OPT_DEC, "schedulers": {"dec": sched}},  # threshold 10: never better, always cut
        "validation": {"dataset": "v", "every": "6ba"},
        "transition_on": {"check_every": "1ba"},
    }
    trainer = _Counting()
    TrainingPipelineOrchestrator(
        _config(data, [step]), tiny_modules(0), {"reg": trainer}, tmp_path / "ck", progress=False
    ).run()
    assert len(trainer.lrs) == 12 and len(set(trainer.lrs[6:])) == 1  # no validation in batches 7-12


def test_data_without_a_whole_batch_is_named_by_validate_and_run(data, tmp_path):
    """21 samples (or the 5 of the validation set), batches of 50, the short one dropped: no batch at
    all. validate said 'no problems' and the run failed with 'train_batches=0 is not a positive number
    of batches' (chunked validation: 'val_batches=0', and without chunks it validated on nothing)."""
    def config(train_batch: int, val_batch: int) -> object:
        return parse_pipeline_config(
            {
                "datasets": {
                    n: {"type": "prep", "path": str(data / n), "batch_size": b, "drop_last": True}
                    for n, b in (("d", train_batch), ("v", val_batch))
                },
                "default_dataset": "d",
                "defaults": {"workers": 0},
                "steps": [{"name": "a", "n_epochs": 1, "train": ["reg"], "optimization": OPT_DEC,
                           "validation": {"dataset": "v", "train_chunk_size": 2}}],
            }
        )

    for cfg, name, samples in ((config(50, 2), "d", 21), (config(4, 50), "v", 5)):
        [plan] = make_plan(cfg)
        assert len(plan.problems) == 1, plan.problems
        line = plan.problems[0].line()
        assert f"step 'a': dataset '{name}' gives no batch per epoch ({samples} samples" in line
        with pytest.raises(PrepError) as err:
            _run(cfg, tmp_path / name)
        assert f"dataset '{name}' gives no batch per epoch" in err.value.what and "drop_last" in err.value.fix


def test_a_step_without_a_checkpoint_before_its_end_is_warned_about(data, tmp_path):
    """validate's plan and the run warn about a step exactly when the run writes no checkpoint before the
    step's end (a kill in it would train the whole step again): no checkpoint_every and no epoch end
    inside the step (one epoch, batches up to an epoch, data that repeats), or a checkpoint_every as long
    as the step; never about a one-batch step. Without the data the plan warns only where it can tell,
    and never wrongly."""
    cases = [  # (step keys, whether a run killed in the step would train all of it again)
        ({"n_epochs": 1}, True),
        ({"n_epochs": 2}, False),
        ({"max_steps": 6}, True),  # the first epoch end (6 batches) is the step's end
        ({"max_steps": 7}, False),
        ({"n_epochs": 2, "checkpoint_every": "2ep"}, True),
        ({"n_epochs": 3, "checkpoint_every": "2ep"}, False),
        ({"max_steps": 5, "checkpoint_every": "5ba"}, True),
        ({"max_steps": 5, "checkpoint_every": "4ba"}, False),
        ({"max_steps": 5, "checkpoint_every": "4ba", "grad_accumulation": 3}, True),  # waits for batch 6
        ({"max_steps": 7, "checkpoint_every": "4ba", "grad_accumulation": 3}, False),
        ({"duration": "20sp", "checkpoint_every": "20sp"}, True),
        ({"duration": "20sp", "checkpoint_every": "16sp"}, False),
        ({"max_steps": 1}, False),  # it writes none either, but there is nothing to lose
        ({"max_steps": 8, "dataset": "endless"}, True),
        ({"max_steps": 8, "dataset": "endless", "checkpoint_every": "3ba"}, False),
    ]
    datasets = {
        "d": {"type": "prep", "path": str(data / "d"), "decode": "raw", "batch_size": 4},
        "endless": {"type": "blend", "sources": [{"dataset": "d"}], "repeat": True},
    }
    for i, (keys, exposed) in enumerate(cases):
        step = {"name": "s", "train": ["reg"], "optimization": OPT_DEC, **keys}
        cfg = _config(data, [step], datasets=datasets)
        [plan] = make_plan(cfg)
        orch, _, _ = _run(cfg, tmp_path / str(i))
        written = [p.name for p in (tmp_path / str(i)).glob("ckpt-*")]
        assert (not written) == (exposed or plan.length.batches == 1), (keys, written)
        assert bool(plan.warnings) == exposed, (keys, plan.warnings)
        assert orch.warnings == [w.line() for w in plan.warnings], keys
        for w in plan.warnings:
            assert "step 's' (" in w.what and "writes no checkpoint before its end" in w.what
            assert w.fix.startswith("set steps.0.checkpoint_every shorter than the step (e.g. ")
        [blind] = make_plan(cfg, build=False)  # without the data: only what it can tell, never wrongly
        assert bool(blind.warnings) <= exposed, keys
        if "n_epochs" in keys:
            assert bool(blind.warnings) == exposed, keys


class _OptimizerStateAtStart(RegressionTrainer):
    """Remembers, at its first batch, each parameter's AdamW moment as the resumed optimizer holds it."""

    def __init__(self, modules) -> None:
        super().__init__()
        self.names = {id(p): f"{m}.{n}" for m, mod in modules.items() for n, p in mod.named_parameters()}
        self.moments: dict[str, torch.Tensor] | None = None

    def train_step(self, batch, ctx):
        if self.moments is None:
            opt = ctx.optimizers["all"]
            self.moments = {self.names[id(p)]: s["exp_avg"].clone() for p, s in opt.state.items()}
        return super().train_step(batch, ctx)


def test_a_resumed_optimizer_that_trains_other_parameters_is_refused_or_matched_by_name(data, tmp_path):
    """torch gives a loaded optimizer its saved state by position, so one parameter trained or frozen
    otherwise (modules built otherwise, a projection head frozen) would hand every later parameter
    another's moments. The resume is refused, naming the parameters; with --allow-config-change each
    parameter both runs train gets its own saved state, by name, and the others start fresh. A
    checkpoint that records no names is refused when the counts differ."""
    steps = [{"name": "both", "max_steps": 6, "train": ["reg"], "optimization": OPT_BOTH,
              "checkpoint_every": "3ba"}]
    cfg = _config(data, steps)
    folder = tmp_path / "ck"
    _run(cfg, folder, max_batches=3)
    path = ckpt.newest(folder)
    saved = ckpt.load(path)
    names = json.loads(saved["meta"])["optimizer_params"]["all"]
    assert names == [["enc.weight", "enc.bias", "dec.weight", "dec.bias"]]
    state = saved["optimizers"]["all"]
    params = state["param_groups"][0]["params"]
    by_name = {n: state["state"][i]["exp_avg"] for n, i in zip(names[0], params, strict=True)}

    def resume(modules, **kw):
        trainer = _OptimizerStateAtStart(modules)
        TrainingPipelineOrchestrator(cfg, modules, {"reg": trainer}, folder, progress=False, **kw).run()
        return trainer

    modules = tiny_modules(0)
    modules["enc"].bias.requires_grad_(False)
    with pytest.raises(PrepError) as err:
        resume(modules)
    assert "optimizer 'all'" in err.value.what and "no longer trains enc.bias" in err.value.what
    assert err.value.where == str(path) and "--allow-config-change" in err.value.fix
    trainer = resume(modules, allow_config_change=True)
    assert set(trainer.moments) == {"enc.weight", "dec.weight", "dec.bias"}
    for name, moment in trainer.moments.items():
        assert torch.equal(moment, by_name[name]), name
    for f in folder.glob("*.pt"):  # back to the saved checkpoint alone
        if f != path:
            f.unlink()
    meta = json.loads(saved["meta"])
    del meta["optimizer_params"]  # as a checkpoint written before names were recorded
    torch.save({**saved, "meta": json.dumps(meta)}, path)
    modules = tiny_modules(0)
    modules["enc"].bias.requires_grad_(False)
    with pytest.raises(PrepError, match=r"saved 4 parameters in 1 group\(s\), this run gives it 3"):
        resume(modules)
    assert torch.equal(resume(tiny_modules(0)).moments["dec.bias"], by_name["dec.bias"])


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_optimizer_state_by_name_gives_each_parameter_its_own_saved_state(data):
    """Any reordering, removal and addition of named parameters across groups: each parameter the
    saved optimizer had gets exactly its own state and its group's settings, new ones none, and torch
    loads the result."""
    pool = [f"m.p{i}" for i in range(8)]
    groups = data.draw(st.integers(1, 3))
    saved = [data.draw(st.lists(st.sampled_from(pool), unique=True, max_size=4)) for _ in range(groups)]
    now = [data.draw(st.lists(st.sampled_from(pool), unique=True, min_size=1, max_size=4))
           for _ in range(groups)]
    flat, now_flat = [n for g in saved for n in g], [n for g in now for n in g]
    assume(len(set(flat)) == len(flat) and len(set(now_flat)) == len(now_flat))
    tensors = {n: torch.full((2,), float(i)) for i, n in enumerate(pool)}
    index = iter(range(len(flat)))
    state = {
        "state": {i: {"step": torch.tensor(1.0), "exp_avg": tensors[n] * 10} for i, n in enumerate(flat)},
        "param_groups": [{"lr": 0.1 * (g + 1), "params": [next(index) for _ in names]}
                         for g, names in enumerate(saved)],
    }
    out = ckpt.optimizer_state_by_name(state, saved, now)
    params = {n: torch.nn.Parameter(tensors[n].clone()) for n in now_flat}
    opt = torch.optim.AdamW([{"params": [params[n] for n in g], "lr": 1.0} for g in now])
    opt.load_state_dict(out)
    for g, (group, names) in enumerate(zip(opt.param_groups, now, strict=True)):
        assert group["lr"] == pytest.approx(0.1 * (g + 1))
        for n in names:
            got = opt.state.get(params[n])
            if n in flat:
                assert torch.equal(got["exp_avg"], tensors[n] * 10), n
            else:
                assert not got, n

