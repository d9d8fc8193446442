"""The documentation: `make docs` builds with warnings as errors, every stage guide's key table is
generated from the config model (so it lists every key), the loader reference covers every public
name of prep.loaders, and docs/architecture.md's module maps name exactly the modules there are."""

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
        page = (site / "stages" / f"{stage}.html").read_text()
        assert "prep:keys" not in page
        for key in get_stage(stage).Config.model_fields:
            assert f"<code>{stage}.{key}</code>" in page, (stage, key)
    reference = (site / "reference.html").read_text()
    assert "window_shards" in reference and "max_skip_fraction" in reference  # arguments, from signatures


def test_every_stage_has_a_guide_and_the_reference_names_every_public_loader() -> None:
    for stage in STAGE_ORDER:
        assert f"<!-- prep:keys {stage} -->" in (ROOT / "docs" / "stages" / f"{stage}.md").read_text()
    reference = (ROOT / "docs" / "reference.md").read_text()
    documented = set(re.findall(r"^::: prep\.loaders\.(\w+)$", reference, re.M))
    documented |= {n.strip() for m in re.findall(r"members: \[([^\]]*)\]", reference) for n in m.split(",")}
    assert set(prep.loaders.__all__) <= documented, set(prep.loaders.__all__) - documented


# ------------------------------------------------------------------------------ architecture module map
def _section(text: str, heading: str) -> str:
    """The text of `## heading` up to the next `## `."""
    start = text.index(f"\n## {heading}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def _modules(package: str) -> set[str]:
    """Every module of src/prep/PACKAGE, as a path relative to it without `.py` (`io/cache`)."""
    base = ROOT / "src" / "prep" / package
    return {p.relative_to(base).with_suffix("").as_posix() for p in base.rglob("*.py")
            if p.name != "__init__.py"}


def test_architecture_module_map_lists_exactly_the_modules_that_exist() -> None:
    """docs/architecture.md's per-package maps (formats, stages and runtime, loaders, pipeline) name
    every module of those packages, and every module they name exists."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    named: dict[str, set[str]] = {}

    formats = _section(text, "`prep.formats`")
    named["formats"] = {n for row in re.findall(r"^\| (`[^|]*`) \|", formats, re.M)
                        for n in re.findall(r"`(\w+)`", row)} - {"module"}

    runs = _section(text, "`prep.stages` and `prep.runtime`")
    named["stages"] = set(re.findall(r"`stages\.(\w+)", runs))
    named["stages"] |= {n for row in re.findall(r"^\| \w+ \| ([^|]*) \|", runs, re.M)
                        for n in re.findall(r"`(\w+)`", row)}
    named["runtime"] = set(re.findall(r"`runtime\.(\w+)", runs))

    block = _section(text, "`prep.loaders`").split("```")[1]
    named["loaders"], folder = set(), ""
    for line in block.splitlines():
        if m := re.match(r"^  (\w+)/", line):
            folder = m.group(1) + "/"
        elif re.match(r"^  \w+\.py", line):
            folder = ""
        named["loaders"] |= {folder + n for n in re.findall(r"\b(\w+)\.py\b", line)}

    named["pipeline"] = set(re.findall(r"`(\w+)`\s+\(", _section(text, "`prep.pipeline`")))

    for package, names in named.items():
        assert names == _modules(package), (package, "missing from the map:", _modules(package) - names,
                                            "named but absent:", names - _modules(package))


def test_no_escaped_pipe_inside_code_in_docs_tables() -> None:
    """GitHub needs `\\|` for a pipe in a table cell, but the site (Python-Markdown) keeps the backslash
    inside a code span, so a copied command would carry it: table cells hold no `\\|` in code."""
    bad = [f"{page.relative_to(ROOT)}:{n}: {span}"
           for page in sorted((ROOT / "docs").rglob("*.md"))
           for n, line in enumerate(page.read_text().splitlines(), 1) if line.startswith("|")
           for span in re.findall(r"`[^`]*`", line) if "\\|" in span]
    assert not bad, bad


def test_ingest_key_examples_are_the_keys_ingest_local_gives() -> None:
    """docs/ingest.md's `path` → `key` examples are what `sample_key` returns (`…`: a prefix)."""
    from prep.stages.ingest_local import sample_key

    pairs = re.findall(r"`([^`]+)` → `([^`]+)`", (ROOT / "docs" / "ingest.md").read_text())
    assert len(pairs) >= 3
    for path, key in pairs:
        got = sample_key(path)
        assert got.startswith(key[:-1]) if key.endswith("…") else got == key, (path, key, got)


def test_repo_paths_named_in_the_docs_exist() -> None:
    """Every repo path the README, docs/ and recipes/README.md name in code (`examples/x.py`,
    `recipes/slurm/`, ...) exists: users open and run them."""
    pages = [ROOT / "README.md", ROOT / "recipes" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    named = {(page.relative_to(ROOT).as_posix(), path) for page in pages
             for path in re.findall(r"`((?:docs|examples|configs|recipes|bench|src|tests)/[\w./-]*)",
                                    page.read_text())}
    assert len(named) > 20
    missing = sorted((page, path) for page, path in named if not (ROOT / path).exists())
    assert not missing, missing


def _prep_commands(text: str) -> list[str]:
    """Every `prep ...` command line the text shows: in code spans, and in shell blocks (a trailing `\\`
    continues the line; a `#` comment ends it)."""
    lines = []
    for lang, block in re.findall(r"^```(\w*)\n(.*?)^```", text, re.M | re.S):
        if lang in ("bash", "sh", ""):
            lines += [ln.split(" #")[0] for ln in block.replace("\\\n", " ").splitlines()]
    prose = re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)
    lines += re.findall(r"`([^`\n]+)`", prose)
    return [m.group(0) for ln in lines for m in [re.search(r"(?:^|\s|-m )(prep|prep\.cli)\s.*", ln)] if m]


def test_every_prep_command_and_option_the_docs_show_exists() -> None:
    """`prep SUB [SUB] ... --option` in the README, docs/ and recipes/README.md: the command exists and
    takes each option shown (typer's own parser, not its help text)."""
    typer = pytest.importorskip("typer")
    from prep.cli import app

    root = typer.main.get_command(app)
    pages = [ROOT / "README.md", ROOT / "recipes" / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    checked, bad = 0, []
    for page in pages:
        for cmd in _prep_commands(page.read_text()):
            words = cmd.split()[1:]
            node, path = root, ["prep"]
            while words and hasattr(node, "commands") and words[0] in node.commands:
                node = node.commands[words[0]]
                path.append(words.pop(0))
            if hasattr(node, "commands"):
                if words and re.fullmatch(r"[a-z_]+", words[0]):
                    bad.append(f"{page.name}: {cmd!r}: no command {' '.join(path)} {words[0]}")
                continue
            options = {o for p in node.params for o in (*p.opts, *p.secondary_opts)}
            for flag in re.findall(r"(?<!\S)(--?[a-z][a-z-]*)", " ".join(words)):
                checked += 1
                if flag not in options:
                    bad.append(f"{page.name}: {cmd!r}: {' '.join(path)} takes no {flag}")
    assert checked > 30
    assert not bad, bad


def test_the_built_site_links_pages_as_files(tmp_path: Path) -> None:
    """The README says to open site/index.html: every link between pages names an .html file that
    exists (file:// shows a folder listing for a `page/` link)."""
    pytest.importorskip("mkdocstrings")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "mkdocs", "build", "-q", "-d", str(site)], cwd=ROOT, check=True,
                   capture_output=True, timeout=300)
    broken = []
    for page in site.rglob("*.html"):
        if page.name == "404.html":  # a web server's page: absolute links, by design
            continue
        for href in re.findall(r'href="([^"#:?]+)(?:#[^"]*)?"', page.read_text()):
            target = (page.parent / href).resolve()
            if href.endswith("/") or (href.endswith(".html") and not target.is_file()):
                broken.append(f"{page.relative_to(site)} -> {href}")
    assert not broken, broken[:10]
