"""mkdocs hook: `<!-- prep:keys STAGE -->` in a page becomes the table of that stage's config keys, read
from its pydantic model (`prep.stages.base.key_docs`, the same listing as `prep keys STAGE`), so the
guides never drift from the code."""

from __future__ import annotations

import re
from typing import Any

MARK = re.compile(r"<!-- prep:keys ([a-z_]+) -->")


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def keys_table(stage: str) -> str:
    from prep.stages import get_stage
    from prep.stages.base import key_docs

    rows = ["| key | type | default | what it does |", "|---|---|---|---|"]
    for k in key_docs(get_stage(stage).Config):
        # a pipe inside a code span does not split the cell; in plain text it is escaped
        rows.append(f"| `{stage}.{k.key}` | `{k.type}` | `{k.default}` | {_cell(k.description)} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return MARK.sub(lambda m: keys_table(m.group(1)), markdown)
