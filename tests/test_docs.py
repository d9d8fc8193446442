"""The documentation: `make docs` builds with warnings as errors, every stage guide's key table is
generated from the config model (so it lists every key), and the loader reference covers every public
name of prep.loaders."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import prep.loaders
from prep.stages import STAGE_ORDER, get_stage

ROOT = Path(__file__).resolve().parents[1]


def test_docs_build_strict_with_generated_key_tables(tmp_path: Path) -> None:
    pytest.importorskip("mkdocstrings")
    site = tmp_path / "site"
    # no -q: it would hide the warnings --strict turns into a failure
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "WARNING" not in run.stderr, run.stdout + run.stderr
    for stage in STAGE_ORDER:
        page = (site / "stages" / stage / "index.html").read_text()
        assert "prep:keys" not in page
        for key in get_stage(stage).Config.model_fields:
            assert f"<code>{stage}.{key}</code>" in page, (stage, key)
    reference = (site / "reference" / "index.html").read_text()
    assert "window_shards" in reference and "max_skip_fraction" in reference  # arguments, from signatures


def test_every_stage_has_a_guide_and_the_reference_names_every_public_loader() -> None:
    for stage in STAGE_ORDER:
        assert f"<!-- prep:keys {stage} -->" in (ROOT / "docs" / "stages" / f"{stage}.md").read_text()
    reference = (ROOT / "docs" / "reference.md").read_text()
    documented = set(re.findall(r"^::: prep\.loaders\.(\w+)$", reference, re.M))
    documented |= {n.strip() for m in re.findall(r"members: \[([^\]]*)\]", reference) for n in m.split(",")}
    assert set(prep.loaders.__all__) <= documented, set(prep.loaders.__all__) - documented
