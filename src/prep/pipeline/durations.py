"""Durations in Composer's units: `10ep` (epochs), `5000ba` (batches), `2e6sp` (samples).

One parser for every place a length or a cadence is written (`duration`, `validation.every`,
`checkpoint_every`, `transition_on.check_every`), so they all read the same way. A bare integer is a
number of batches (what `checkpoint_every: 1000` means to everyone who writes it).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

Unit = Literal["ep", "ba", "sp"]
UNITS: dict[str, str] = {"ep": "epochs", "ba": "batches", "sp": "samples"}
_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ep|ba|sp)\s*$")


@dataclass(frozen=True, slots=True)
class Duration:
    """A positive whole number of epochs, batches or samples."""

    value: int
    unit: Unit

    def __str__(self) -> str:
        return f"{self.value}{self.unit}"

    def to_batches(self, batches_per_epoch: int | None, global_batch: int | None) -> int | None:
        """This duration in batches (samples round up to whole batches); None when it needs a size
        that is unknown (an endless dataset, or a plan made without the data)."""
        if self.unit == "ba":
            return self.value
        if self.unit == "ep":
            return None if batches_per_epoch is None else self.value * batches_per_epoch
        return None if not global_batch else -(-self.value // global_batch)


def parse_duration(value: Any) -> Duration:
    """`"10ep"`, `"5000ba"`, `"2e6sp"` or a bare int (batches). Raises ValueError saying what is wrong
    (pydantic turns it into an error at the key's path and line)."""
    if isinstance(value, Duration):
        return value
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a duration; write e.g. 10ep, 5000ba or 2e6sp")
    if isinstance(value, int):
        number, unit = float(value), "ba"
    elif isinstance(value, str) and (m := _RE.match(value)):
        number, unit = float(m.group(1)), m.group(2)
    else:
        raise ValueError(f"{value!r} is not a duration; write e.g. 10ep, 5000ba or 2e6sp (a bare "
                         "integer counts batches)")
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"{value!r} is not a whole number of {UNITS[unit]}")
    if number <= 0:
        raise ValueError(f"{value!r} must be > 0")
    return Duration(int(number), unit)  # type: ignore[arg-type]
