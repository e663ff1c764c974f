"""The READMEs stay consistent while several people edit them: links resolve, the settings table matches the model.

Sections move (issue 9.8 gathered them under "Operations"; the large app's run history moved to
bench/README.md) and settings are added by different branches; these checks catch a `(#anchor)`
or `(other.md#anchor)` whose heading was renamed or moved, and a setting without a row.
"""

import re
from pathlib import Path

from pypnm.clients import CACERT_ENV, TOKEN_ENV
from pypnm.settings import CONFIG_ENV, ENV_PREFIX, RESTART_ONLY, Settings
from pypnm.supervisor.upgrade import BOOTSTRAP_ENV

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BENCH_README = ROOT / "bench" / "README.md"


def prose_lines(path: Path = README) -> list[str]:
    """A markdown file's lines outside fenced code blocks (a `# comment` in a sh block is no heading)."""
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (but - and _), spaces to -."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(path: Path = README) -> list[str]:
    return [m.group(1) for line in prose_lines(path) if (m := re.match(r"#{1,6} (.+)", line))]


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


def test_every_link_to_a_heading_of_either_readme_names_one() -> None:
    """`(#a)` in bench/README.md, `(bench/README.md#a)` and `(../README.md#a)` across the two."""
    anchors = {path: {anchor(h) for h in headings(path)} for path in (README, BENCH_README)}
    missing = []
    for source in anchors:
        links = re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", source.read_text())
        assert links, f"no links to a heading found in {source.name}: the pattern is wrong"
        for target, name in links:
            path = (source.parent / target).resolve() if target else source
            if "://" in target or (path.exists() and path not in anchors):
                continue  # a web page's fragment, or another file's: not checked here
            if name not in anchors.get(path, set()):
                missing.append(f"{source.relative_to(ROOT)}: ({target}#{name})")
    assert missing == []


def test_the_settings_table_has_a_row_for_every_setting_and_no_other() -> None:
    rows = [line for line in section("Settings").splitlines() if line.startswith("| `")]
    named = {name for row in rows for name in re.findall(r"`([a-z_]+)`", row.split("|")[1])}
    assert named == set(Settings.model_fields)


def test_environment_variables_named_in_the_readme_exist() -> None:
    known = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    known |= {CONFIG_ENV, TOKEN_ENV, CACERT_ENV}  # the settings file, and the CLI's own
    known |= {BOOTSTRAP_ENV}  # what a self-upgrade's new master shows in `ps`
    assert sorted(set(re.findall(r"PYPNM_[A-Z_]+", README.read_text())) - known) == []


def test_every_restart_only_setting_is_marked_so_in_the_settings_table() -> None:
    rows = [line for line in section("Settings").splitlines() if line.startswith("| `")]
    for name in RESTART_ONLY:
        row = next(row for row in rows if f"`{name}`" in row.split("|")[1])
        assert "restart only" in row, name
