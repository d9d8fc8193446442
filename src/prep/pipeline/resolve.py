"""Where a step's batch size and worker count come from: one pure function, one priority order.

step > dataset > pipeline defaults > the caller's args > built-in (batch_size 2, workers 8), as
FluxFlow documents it (its code reads only `dataset.batch_size or args.batch_size`). "Unset" is None
everywhere (a config never holds an explicit null for these keys: the schema refuses it), so an
explicit 2 is told apart from the default 2 and the answer says which level decided.

For a composite dataset (blend, mix, concat) the dataset level is the nearest dataset on the way from
the leaf up to the step's dataset that sets the key: a blend source keeps its own batch size (a 256 px
source at 64, a 1024 px one at 8), and a key set on the blend fills the sources that do not set it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

BUILTIN: dict[str, int] = {"batch_size": 2, "workers": 8}
LEVELS = ("step", "dataset", "defaults", "args", "built-in")


@dataclass(frozen=True, slots=True)
class Resolved:
    """A value and the level it came from (`step`, `dataset NAME`, `defaults`, `args`, `built-in`)."""

    value: int
    source: str

    def __str__(self) -> str:
        return f"{self.value} ({self.source})"


def resolve_setting(
    key: str,
    *,
    step: int | None = None,
    datasets: Sequence[tuple[str, int | None]] = (),
    defaults: int | None = None,
    args: Mapping[str, int | None] | None = None,
) -> Resolved:
    """The value of `key` ('batch_size' or 'workers') by priority. `datasets` lists (name, value) from
    the innermost dataset outwards; None means unset at that level."""
    if step is not None:
        return Resolved(step, "step")
    for name, value in datasets:
        if value is not None:
            return Resolved(value, f"dataset {name}")
    if defaults is not None:
        return Resolved(defaults, "defaults")
    arg = (args or {}).get(key)
    if arg is not None:
        return Resolved(arg, "args")
    return Resolved(BUILTIN[key], "built-in")
