"""The README stays a front door and the guides stay connected: its size, and every relative link."""

from __future__ import annotations

import glob
import os
import re

import pytest

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
README = os.path.join(REPO, "README.md")
GUIDES = sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))
README_MAX_BYTES = 12_000

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def links(path: str) -> list[str]:
    """The targets of the inline Markdown links of a file, outside code blocks and code spans."""
    with open(path, encoding="utf-8") as handle:
        text = handle.read()
    text = CODE_SPAN.sub("", FENCE.sub("", text))
    return LINK.findall(text)


def relative_targets(path: str) -> list[tuple[str, str]]:
    """(link as written, the file it names) for every relative link of a file; anchors stripped."""
    found = []
    for target in links(path):
        if SCHEME.match(target):  # http(s), mailto: not files of this repository
            continue
        file_part = target.split("#", 1)[0].split("?", 1)[0]
        if not file_part:  # "#anchor": this same file
            continue
        found.append((target, os.path.normpath(os.path.join(os.path.dirname(path), file_part))))
    return found


def test_readme_is_a_front_door():
    size = os.path.getsize(README)
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes: move the detail to a guide in docs/"


def test_there_are_guides():
    assert GUIDES, "docs/*.md: no guide found"


@pytest.mark.parametrize("path", [README, *GUIDES], ids=lambda path: os.path.relpath(path, REPO))
def test_every_relative_link_names_a_file_that_exists(path):
    broken = [target for target, resolved in relative_targets(path) if not os.path.exists(resolved)]
    assert not broken, f"{os.path.relpath(path, REPO)} links to missing files: {broken}"


def test_readme_links_every_guide():
    linked = {resolved for _, resolved in relative_targets(README)}
    missing = [os.path.relpath(guide, REPO) for guide in GUIDES if os.path.normpath(guide) not in linked]
    assert not missing, f"README.md does not link {missing}"


def test_link_extraction_skips_code_and_external_links(tmp_path):
    page = tmp_path / "page.md"
    page.write_text(
        "[a](a.md) [b](sub/b.md#part) [web](https://example.com/x.md) [here](#top)\n"
        "`[not](code.md)`\n```\n[not](block.md)\n```\n[`code text`](c.md)\n",
        encoding="utf-8")
    assert [target for target, _ in relative_targets(str(page))] == ["a.md", "sub/b.md#part", "c.md"]
