"""The table printed at the end of every stage (and its JSON twin for machines)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from prep.runtime.runner import StageRun

MAX_NOTES = 20


def print_summary(run: StageRun, console: Console) -> None:
    doc = run.to_json()
    if run.nothing_to_do:  # no counts or rates: they would describe work an earlier run did
        n = doc["tasks_in_slice"]
        console.print(f"prep run {run.stage}: nothing to do — all {n:,} task(s) were done already and "
                      "their outputs are intact (--force redoes them)", highlight=False, markup=False)
        return
    table = Table(title=f"prep run {run.stage}", show_header=True, header_style="bold")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("tasks planned (whole stage)", str(doc["tasks_planned"]))
    table.add_row("tasks in this run", str(doc["tasks_in_slice"]))
    table.add_row("done / skipped (already done) / failed",
                  f"{doc['done']} / {doc['skipped']} / {doc['failed']}")
    for k, v in sorted(doc["counts"].items()):
        table.add_row(k.replace("_", " "), f"{v:,}")
    seen = doc["counts"].get("samples_in")
    for reason, n in sorted(doc["dropped"].items(), key=lambda kv: (-kv[1], kv[0])):  # each failure once
        share = f" ({100 * n / seen:.1f}%)" if seen else ""
        table.add_row(f"dropped: {reason}", f"{n:,}{share}")
    samples = doc["samples_done"]
    if samples and run.seconds > 0:
        table.add_row("samples/s", f"{samples / run.seconds:,.0f}")
    table.add_row("seconds", f"{run.seconds:.2f}")
    if run.waiting_for_other_slices:
        table.add_row("finalize", "waiting for other slices")
    console.print(table)
    notes = doc["notes"]
    for line in notes[:MAX_NOTES]:
        console.print(f"• {line}", highlight=False, markup=False)
    if len(notes) > MAX_NOTES:
        console.print(f"… and {len(notes) - MAX_NOTES} more notes (use --json for all)")
    for err in run.grouped_errors():
        console.print(Text("error: ", style="red") + Text(err), highlight=False, soft_wrap=True)
