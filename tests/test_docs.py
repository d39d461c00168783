"""The documentation site (mkdocs.yml, docs/) builds with --strict, the README's links reach it, and no page is an
orphan: what a newcomer follows from the README leads somewhere."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from markdown.extensions.toc import slugify

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MKDOCS = Path(sys.executable).parent / "mkdocs"

LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^ *```.*?^ *```", flags=re.M | re.S)


def links(markdown: str) -> list[str]:
    """The targets of the Markdown links outside code blocks and code spans."""
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", markdown))
    return LINK.findall(text)


def anchors(page: Path) -> set[str]:
    """The ids mkdocs's toc extension gives the page's headings (its default slugify)."""
    text = FENCE.sub("", page.read_text())
    return {slugify(re.sub(r"[`*]", "", title).strip(), "-")
            for title in re.findall(r"^#{1,6} +(.+?) *#*$", text, flags=re.M)}


def nav_pages(nav) -> list[str]:
    if isinstance(nav, str):
        return [nav]
    if isinstance(nav, dict):
        return [page for value in nav.values() for page in nav_pages(value)]
    return [page for item in nav for page in nav_pages(item)]


def test_the_site_builds_strict(tmp_path):
    assert MKDOCS.exists(), f"{MKDOCS} is missing: mkdocs is in requirements.txt (make test installs it)"
    proc = subprocess.run([str(MKDOCS), "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml"),
                           "--site-dir", str(tmp_path / "site")],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "stages" / "train" / "index.html").exists()


def test_every_relative_link_of_the_readme_reaches_a_file_and_heading():
    found = links((ROOT / "README.md").read_text())
    assert any(target.startswith("docs/") for target in found)
    broken = []
    for target in found:
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (ROOT / path).resolve() if path else ROOT / "README.md"
        if not file.is_relative_to(ROOT) or not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with that anchor in {file.relative_to(ROOT)}")
    assert not broken, broken


def test_every_page_is_in_the_nav():
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=yaml.BaseLoader)
    assert config["docs_dir"] == "docs" and config["theme"]["name"] == "material"
    listed = nav_pages(config["nav"])
    pages = sorted(str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md"))
    assert sorted(listed) == pages, {"not in the nav": sorted(set(pages) - set(listed)),
                                     "in the nav, no such page": sorted(set(listed) - set(pages))}
    assert len(listed) == len(set(listed)), "a page is twice in the nav"


def test_the_readme_keeps_the_commands_ci_runs():
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"^make test\b", readme, flags=re.M)  # .ci/run runs the README's test command
    assert re.search(r"^make run\b", readme, flags=re.M)
    assert re.search(r"^make init DATA=", readme, flags=re.M) and re.search(r"^make run +DATA=", readme, flags=re.M)
