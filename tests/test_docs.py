"""README and docs/ stay true to the code: a short README whose commands table and presets match the CLI and
configs/, every option documented in docs/commands.md, and no link that leads nowhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
LINK = re.compile(r"\]\(([^)\s]+)\)")


def cli_commands() -> dict:
    import typer.main

    from recdreamer_gs.cli import app

    return typer.main.get_command(app).commands


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", path.read_text(), flags=re.S), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 150


@pytest.mark.parametrize("page", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page: Path):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        file, _, anchor = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        assert dest.exists(), f"{page.name}: {target} does not exist"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{page.name}: no heading #{anchor} in {dest.name}"


def test_readme_commands_table_lists_every_command():
    table = [line for line in README.read_text().splitlines() if line.startswith("| `recdreamer-gs ")]
    named = {re.match(r"\| `recdreamer-gs (\S+)", line).group(1) for line in table}
    assert named == set(cli_commands())


def test_every_option_is_in_docs_commands():
    text = (DOCS / "commands.md").read_text() + (DOCS / "batch.md").read_text()
    for name, command in cli_commands().items():
        assert f"recdreamer-gs {name}" in text
        for param in command.params:
            for opt in param.opts:
                if opt.startswith("--"):
                    assert opt in text, f"{name} {opt} is not documented in docs/commands.md"


def test_every_preset_is_in_readme_and_methods():
    presets = sorted(p.stem for p in (ROOT / "configs").glob("*.yaml"))
    assert "preview" in presets
    readme, methods = README.read_text(), (DOCS / "methods.md").read_text()
    for preset in presets:
        assert f"`{preset}`" in readme and f"`{preset}`" in methods, preset


def test_docs_index_lists_every_page():
    index = (DOCS / "README.md").read_text()
    for page in DOCS.glob("*.md"):
        if page.name != "README.md":
            assert f"]({page.name})" in index, page.name
