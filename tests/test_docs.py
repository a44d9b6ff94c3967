"""The docs a newcomer walks stay true to the tree: the README's stage table lists every experiment, every
relative link in README.md and docs/ resolves, the README stays short, and docs/adding-a-stage.md names files
that exist (walked for an existing stage)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
README_MAX_WORDS = 1500

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE = re.compile(r"`([^`]+)`")
# docs/adding-a-stage.md walked for the SEED tokenizer's stage 1 (the placeholders it defines)
WALK = {"<E>": "seed_tokenizer_qformer", "<S>": "seed_qformer", "<D>": "seed_tokenizer", "<G>": "qformer",
        "<F>": "seed_tokenizer",
        "<M>": "blip2", "<P>": "qformer_pretrain", "<T>": "seed_tokenizer"}


def section(text: str, heading: str) -> str:
    """The lines under `## heading` up to the next heading of level 1 or 2."""
    lines = text.splitlines()
    start = lines.index(f"## {heading}") + 1
    end = next((i for i in range(start, len(lines)) if re.match(r"#{1,2} ", lines[i])), len(lines))
    return "\n".join(lines[start:end])


def stage_table_names(text: str) -> set[str]:
    rows = [ln for ln in section(text, "Stages").splitlines() if ln.startswith("|")]
    return {name for row in rows for cell in row.split("|")[1:3] for name in CODE.findall(cell)}


def test_readme_stage_table_lists_every_experiment_and_its_tiny_twin():
    experiments = {p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")}
    listed = stage_table_names(README.read_text())
    assert experiments - listed == set(), f"experiments missing from README.md's stage table: {experiments - listed}"
    assert listed - experiments == set(), f"README.md's stage table names no experiment: {listed - experiments}"


def test_stage_table_parser_sees_a_missing_row():
    text = "## Stages\n\n| experiment | tiny twin | what |\n|---|---|---|\n| `a` | `a_tiny` | x `not_a_name` |\n\n## Next\n| `b` |"
    assert stage_table_names(text) == {"a", "a_tiny"}


def relative_links(path: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.DOTALL)  # code blocks hold commands, not links
    return [t for t in LINK.findall(text) if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_every_relative_link_resolves(path):
    broken = [t for t in relative_links(path) if not (path.parent / t.split("#")[0]).exists()]
    assert not broken, f"{path.relative_to(ROOT)}: links to nothing: {broken}"


def test_link_checker_sees_links_and_skips_urls(tmp_path):
    doc = tmp_path / "a.md"
    doc.write_text("[x](b.md) ![i](img/c.png) [u](https://x.org) [s](#top) [d](b.md#part)\n```\n[no](z.md)\n```\n")
    assert relative_links(doc) == ["b.md", "img/c.png", "b.md#part"]


def test_readme_is_short():
    words = len(README.read_text().split())
    assert words <= README_MAX_WORDS, f"README.md has {words} words (<= {README_MAX_WORDS}: move detail into docs/)"


def named_paths(text: str) -> set[str]:
    """Repository paths named in `code` spans: a known top-level folder or file, no spaces or wildcards."""
    tops = {p.name for p in ROOT.iterdir()}
    out = set()
    for span in CODE.findall(text):
        if " " in span or "*" in span or "=" in span or "$" in span:
            continue
        if span.split("/")[0] in tops and ("/" in span or "." in span):
            out.add(span)
    return out


def test_adding_a_stage_names_files_that_exist_for_an_existing_stage():
    text = (ROOT / "docs" / "adding-a-stage.md").read_text()
    table = [ln for ln in section(text, "The files").splitlines() if ln.startswith("| ") and "`" in ln]
    files = [CODE.findall(row.split("|")[2])[0] for row in table]
    assert len(files) >= 15 and any("<S>" in f for f in files) and any("<E>" in f for f in files)
    for placeholder in WALK:
        assert placeholder in text
    missing = []
    for pattern in files:
        path = pattern
        for placeholder, value in WALK.items():
            path = path.replace(placeholder, value)
        if not (ROOT / path).is_file():
            missing.append(f"{pattern} -> {path}")
    assert not missing, f"docs/adding-a-stage.md names files that {WALK['<E>']} does not have: {missing}"
    concrete = {p for p in named_paths(text) if "<" not in p}
    assert not [p for p in concrete if not (ROOT / p).exists()]


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_every_repository_path_named_in_the_docs_exists(path):
    missing = sorted(p for p in named_paths(path.read_text()) if "<" not in p and not (ROOT / p).exists())
    assert not missing, f"{path.relative_to(ROOT)} names paths that do not exist: {missing}"
