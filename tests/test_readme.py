"""The README stays consistent while several people edit it: links resolve, the settings table matches the model.

Sections move (issue 9.8 gathered them under "Operations") and settings are added by different
branches; these checks catch a `(#anchor)` whose heading was renamed and a setting without a row.
"""

import re
from pathlib import Path

from pypnm.cli import CACERT_ENV, TOKEN_ENV
from pypnm.settings import CONFIG_ENV, ENV_PREFIX, RESTART_ONLY, Settings

README = Path(__file__).resolve().parents[1] / "README.md"


def prose_lines() -> list[str]:
    """The README's lines outside fenced code blocks (a `# comment` in a sh block is no heading)."""
    lines, fenced = [], False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (but - and _), spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings() -> list[str]:
    return [m.group(1) for line in prose_lines() if (m := re.match(r"#{1,6} (.+)", line))]


def section(title: str) -> str:
    text = "\n".join(prose_lines())
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def test_every_in_page_link_names_a_heading_and_no_two_headings_share_an_anchor() -> None:
    anchors = [anchor(h) for h in headings()]
    assert len(anchors) == len(set(anchors)), sorted(a for a in anchors if anchors.count(a) > 1)
    links = re.findall(r"\]\(#([^)]+)\)", README.read_text())
    assert links, "no in-page links found: the pattern is wrong"
    assert sorted(set(links) - set(anchors)) == []


def test_the_settings_table_has_a_row_for_every_setting_and_no_other() -> None:
    rows = [line for line in section("Settings").splitlines() if line.startswith("| `")]
    named = {name for row in rows for name in re.findall(r"`([a-z_]+)`", row.split("|")[1])}
    assert named == set(Settings.model_fields)


def test_environment_variables_named_in_the_readme_exist() -> None:
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    known |= {CONFIG_ENV, TOKEN_ENV, CACERT_ENV}  # the settings file, and the CLI's own
    assert sorted(set(re.findall(r"PYPNM_[A-Z_]+", README.read_text())) - known) == []


def test_every_restart_only_setting_is_marked_so_in_the_settings_table() -> None:
    rows = [line for line in section("Settings").splitlines() if line.startswith("| `")]
    for name in RESTART_ONLY:
        row = next(row for row in rows if f"`{name}`" in row.split("|")[1])
        assert "restart only" in row, name
