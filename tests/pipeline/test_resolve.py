"""batch_size / workers resolution: step > dataset > defaults > caller's args > (2, 8), as one pure
function; "unset" (None) is told apart from every explicit value, including the built-in ones."""

import pytest

from prep.pipeline import parse_pipeline_config
from prep.pipeline.data import resolve_batch_size, resolve_workers
from prep.pipeline.resolve import Resolved, resolve_setting

# (key, step, datasets innermost first, defaults, args, expected value, expected source)
TABLE = [
    # FluxFlow's documented priority, level by level
    ("batch_size", 16, [("hr", 2)], 4, {"batch_size": 8}, 16, "step"),
    ("batch_size", None, [("hr", 2)], 4, {"batch_size": 8}, 2, "dataset hr"),
    ("batch_size", None, [("hr", None)], 4, {"batch_size": 8}, 4, "defaults"),
    ("batch_size", None, [("hr", None)], None, {"batch_size": 8}, 8, "args"),
    ("batch_size", None, [("hr", None)], None, {}, 2, "built-in"),
    ("batch_size", None, [], None, None, 2, "built-in"),
    ("workers", None, [("hr", None)], None, {"workers": 3}, 3, "args"),
    ("workers", None, [], None, None, 8, "built-in"),
    ("workers", 0, [("hr", 4)], 2, {"workers": 1}, 0, "step"),  # 0 workers is a value, not "unset"
    # FluxFlow's code reads `dataset.batch_size or args.batch_size`: the step's value was lost, and a
    # step's default of 2 could not be told from an explicit 2
    ("batch_size", 2, [("hr", 8)], None, {"batch_size": 4}, 2, "step"),
    ("batch_size", None, [("hr", 8)], 2, None, 8, "dataset hr"),
    ("batch_size", 2, [], None, None, 2, "step"),  # explicit 2 is not the built-in 2
    # the guide's recommendation: warmup uses the dataset's 2, main_training overrides to 4
    ("batch_size", None, [("high_res", 2)], None, None, 2, "dataset high_res"),
    ("batch_size", 4, [("high_res", 2)], None, None, 4, "step"),
    # nested: a blend source keeps its own; the blend's value fills sources without one
    ("batch_size", None, [("art", 16), ("mixed", 64)], 4, None, 16, "dataset art"),
    ("batch_size", None, [("laion", None), ("mixed", 64)], 4, None, 64, "dataset mixed"),
    ("batch_size", None, [("laion", None), ("mixed", None)], 4, None, 4, "defaults"),
    # args with the key unset fall through to the built-in
    ("batch_size", None, [], None, {"batch_size": None, "workers": 5}, 2, "built-in"),
]


@pytest.mark.parametrize(("key", "step", "datasets", "defaults", "args", "value", "source"), TABLE)
def test_resolution_table(key, step, datasets, defaults, args, value, source):
    got = resolve_setting(key, step=step, datasets=datasets, defaults=defaults, args=args)
    assert got == Resolved(value, source)


def test_config_levels_reach_the_resolver():
    """The same rules through a parsed config: unset keys stay None, explicit ones (even 2) count."""
    cfg = parse_pipeline_config(
        {
            "datasets": {
                "hr": {"type": "prep", "path": "/x", "batch_size": 2, "workers": 1},
                "lr": {"type": "prep", "path": "/y"},
                "bl": {"type": "blend", "batch_size": 6, "sources": [{"dataset": "hr"}, {"dataset": "lr"}]},
            },
            "defaults": {"workers": 3},
            "steps": [
                {"name": "warmup", "dataset": "hr", "n_epochs": 1},
                {"name": "main", "dataset": "hr", "batch_size": 2, "workers": 0, "n_epochs": 1},
                {"name": "low", "dataset": "lr", "n_epochs": 1},
                {"name": "blend", "dataset": "bl", "n_epochs": 1},
            ],
        }
    )
    hr, lr, bl = cfg.datasets["hr"], cfg.datasets["lr"], cfg.datasets["bl"]
    s = cfg.steps
    assert resolve_batch_size(cfg, [("hr", hr)], s[0], None) == Resolved(2, "dataset hr")
    assert resolve_batch_size(cfg, [("hr", hr)], s[1], None) == Resolved(2, "step")
    assert resolve_batch_size(cfg, [("lr", lr)], s[2], {"batch_size": 5}) == Resolved(5, "args")
    assert resolve_batch_size(cfg, [("lr", lr)], s[2], None) == Resolved(2, "built-in")
    assert resolve_batch_size(cfg, [("bl", bl), ("hr", hr)], s[3], None) == Resolved(2, "dataset hr")
    assert resolve_batch_size(cfg, [("bl", bl), ("lr", lr)], s[3], None) == Resolved(6, "dataset bl")
    assert resolve_workers(cfg, "hr", s[0], None) == Resolved(1, "dataset hr")
    assert resolve_workers(cfg, "hr", s[1], None) == Resolved(0, "step")
    assert resolve_workers(cfg, "lr", s[2], {"workers": 9}) == Resolved(3, "defaults")
