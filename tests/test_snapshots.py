"""Snapshots cost what changed: unchanged files are hard links to the previous snapshot's copies.

The function that makes a snapshot is tested in-process (what it links, copies, reports as
changed, and its fallback when the file system refuses links); the reload that uses it, with
a real master, workers and runtime directory.
"""

from __future__ import annotations

import asyncio
import errno
import importlib.util
import os
import shutil
import signal
import stat
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    StartService,
    base_env,
    pypnm_command,
    reload_by_sighup,
    serve_marker,
    set_marker,
    supervisor_status,
    wait_until,
    write_app_package,
)
from pypnm.settings import Settings
from pypnm.supervisor import next_snapshot
from pypnm.supervisor import snapshot as snapshot_module
from pypnm.supervisor.snapshot import (
    Compiler,
    Lineage,
    Prepared,
    Snapshot,
    SnapshotChanges,
    SnapshotError,
    prepare_next,
    take_snapshot,
)


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return write_tree(
        tmp_path / "src" / "pkg",
        {
            "__init__.py": "",
            "main.py": "from pkg.util import VALUE\n",
            "util.py": "VALUE = 1\n",
            "sub/__init__.py": "",
            "sub/leaf.py": "LEAF = 'a'\n",
            "data.json": "{}\n",
        },
    )


def snap(
    project: Path,
    directory: Path,
    previous: Snapshot | None = None,
    compiler: Compiler | None = None,
    prepared: Prepared | None = None,
) -> Snapshot:
    return take_snapshot({"pkg": project}, directory, None, compiler or Compiler(), previous, prepared)


def inode(snapshot: Snapshot, relative: str) -> int:
    return os.stat(snapshot.directory / relative).st_ino


def bytecode(snapshot: Snapshot, relative: str) -> Path:
    return Path(importlib.util.cache_from_source(str(snapshot.directory / relative)))


def tree(directory: Path) -> tuple[dict[str, bytes], set[str]]:
    """Every file below `directory` with its bytes, and every directory, by relative path."""
    files = {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    directories = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_dir()}
    return files, directories


def test_unchanged_files_are_links_to_the_previous_snapshot_and_only_changes_are_copied(
    project: Path, tmp_path: Path
) -> None:
    first = snap(project, tmp_path / "gen-1")
    assert first.changes is None and first.shared == 0  # nothing to compare with: all copied

    (project / "util.py").write_text("VALUE = 2\n")
    (project / "sub" / "leaf.py").unlink()
    (project / "sub" / "new.py").write_text("NEW = True\n")
    (project / "data.json").write_text('{"a": 1}\n')
    second = snap(project, tmp_path / "gen-2", first)

    assert second.changes == SnapshotChanges(
        changed=frozenset({"pkg.util"}),
        added=frozenset({"pkg.sub.new"}),
        removed=frozenset({"pkg.sub.leaf"}),
        other=frozenset({"pkg/data.json"}),
    )
    for shared in ("pkg/__init__.py", "pkg/main.py", "pkg/sub/__init__.py"):
        assert inode(second, shared) == inode(first, shared), shared
        assert bytecode(second, shared).stat().st_ino == bytecode(first, shared).stat().st_ino, shared
    assert second.shared == 3
    assert inode(second, "pkg/util.py") != inode(first, "pkg/util.py")
    assert (second.directory / "pkg" / "util.py").read_text() == "VALUE = 2\n"
    assert (first.directory / "pkg" / "util.py").read_text() == "VALUE = 1\n"  # the old generation's code stays
    assert bytecode(second, "pkg/util.py").read_bytes() != bytecode(first, "pkg/util.py").read_bytes()
    assert not (second.directory / "pkg" / "sub" / "leaf.py").exists()
    assert second.code_version != first.code_version


def test_a_file_rewritten_with_the_same_size_and_time_is_still_a_change(project: Path, tmp_path: Path) -> None:
    """An editor that writes twice within one timestamp tick: the content decides, not the stat."""
    util = project / "util.py"
    first = snap(project, tmp_path / "gen-1")
    before = util.stat()
    util.write_text("VALUE = 3\n")  # same size
    os.utime(util, ns=(before.st_atime_ns, before.st_mtime_ns))  # and the same modification time
    second = snap(project, tmp_path / "gen-2", first)
    assert second.changes is not None and second.changes.changed == {"pkg.util"}
    assert (second.directory / "pkg" / "util.py").read_text() == "VALUE = 3\n"


def test_a_touched_file_is_not_a_change_and_stays_shared(project: Path, tmp_path: Path) -> None:
    first = snap(project, tmp_path / "gen-1")
    os.utime(project / "util.py", ns=(1, 1))
    (project / "main.py").write_text((project / "main.py").read_text())  # rewritten with the same bytes
    second = snap(project, tmp_path / "gen-2", first)
    assert second.changes is not None and not second.changes
    assert inode(second, "pkg/util.py") == inode(first, "pkg/util.py")
    assert inode(second, "pkg/main.py") == inode(first, "pkg/main.py")


def test_snapshot_files_are_read_only(project: Path, tmp_path: Path) -> None:
    """Shared files must never change under a running generation: no write bit on any of them."""
    first = snap(project, tmp_path / "gen-1")
    second = snap(project, tmp_path / "gen-2", first)
    files = [path for path in second.directory.rglob("*") if path.is_file()]
    assert len(files) == 11  # 5 sources, their bytecode, data.json
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) & 0o222 == 0, path


def test_removing_the_previous_snapshot_leaves_the_new_one_whole(project: Path, tmp_path: Path) -> None:
    first = snap(project, tmp_path / "gen-1")
    second = snap(project, tmp_path / "gen-2", first)
    contents = tree(second.directory)
    first.remove()
    assert not first.directory.exists()
    assert tree(second.directory) == contents

    third = snap(project, tmp_path / "gen-3", second)  # and it is the previous one of the next
    assert third.shared == 6 and inode(third, "pkg/util.py") == inode(second, "pkg/util.py")


def test_files_are_copied_when_the_file_system_refuses_links(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = snap(project, tmp_path / "gen-1")

    def refuse(source: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link", str(source))

    monkeypatch.setattr(os, "link", refuse)
    (project / "util.py").write_text("VALUE = 4\n")
    second = snap(project, tmp_path / "gen-2", first)

    assert second.shared == 0
    assert second.changes is not None and second.changes.changed == {"pkg.util"}
    for relative in ("pkg/__init__.py", "pkg/main.py", "pkg/util.py", "pkg/sub/leaf.py"):
        assert inode(second, relative) != inode(first, relative), relative
        assert bytecode(second, relative).is_file(), relative
    assert (second.directory / "pkg" / "util.py").read_text() == "VALUE = 4\n"
    assert second.code_version == snap(project, tmp_path / "gen-3").code_version


def test_a_bytecode_file_that_cannot_be_linked_is_compiled_again(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = snap(project, tmp_path / "gen-1")
    link = os.link

    def only_sources(source: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        if str(source).endswith(".pyc"):
            raise OSError(errno.EPERM, "Operation not permitted", str(source))
        link(source, target)

    monkeypatch.setattr(os, "link", only_sources)
    second = snap(project, tmp_path / "gen-2", first)
    assert second.shared == 1  # data.json: the only file without bytecode
    assert bytecode(second, "pkg/util.py").read_bytes() == bytecode(first, "pkg/util.py").read_bytes()


def test_a_syntax_error_in_a_changed_file_names_the_source_and_line(project: Path, tmp_path: Path) -> None:
    first = snap(project, tmp_path / "gen-1")
    (project / "sub" / "leaf.py").write_text("LEAF = 'a'\ndef broken(:\n    pass\n")
    with pytest.raises(SnapshotError, match=rf"SyntaxError: .*\({project / 'sub' / 'leaf.py'}, line 2\)"):
        snap(project, tmp_path / "gen-2", first)
    assert not (tmp_path / "gen-2").exists()  # a failed snapshot leaves nothing behind
    assert first.directory.exists()


def test_module_names_of_extensions_and_single_module_projects(tmp_path: Path) -> None:
    project = write_tree(tmp_path / "src" / "pkg", {"__init__.py": "", "fast.cpython-311-x86_64-linux-gnu.so": "x"})
    first = snap(project, tmp_path / "gen-1")
    (project / "fast.cpython-311-x86_64-linux-gnu.so").write_text("y")
    second = snap(project, tmp_path / "gen-2", first)
    assert second.changes == SnapshotChanges(native=frozenset({"pkg.fast"}))

    module = write_tree(tmp_path / "single", {"app.py": "A = 1\n"}) / "app.py"
    one = take_snapshot({"app": module}, tmp_path / "one-1", None)
    module.write_text("A = 22\n")
    two = take_snapshot({"app": module}, tmp_path / "one-2", None, previous=one)
    assert two.changes == SnapshotChanges(changed=frozenset({"app"}))


def test_a_link_loop_in_the_project_is_copied_once(project: Path, tmp_path: Path) -> None:
    (project / "sub" / "again").symlink_to(project)
    made = snap(project, tmp_path / "gen-1")
    assert "pkg/sub/leaf.py" in made.manifest
    assert not any(name.startswith("pkg/sub/again/sub/again") for name in made.manifest)
    shutil.rmtree(made.directory)


def test_what_reload_excludes_names_and_links_to_nothing_are_left_out(project: Path, tmp_path: Path) -> None:
    """An editor's files: Emacs's lock file (a link to nothing) and backup, vim's swap file; a VCS directory."""
    (project / ".#util.py").symlink_to("user@host.4242:1700000000")
    (project / "sub" / "gone").symlink_to(tmp_path / "nowhere")  # not excluded by name: a link to nothing
    write_tree(project, {"util.py~": "VALUE = 0\n", "sub/.leaf.py.swp": "swap", ".git/HEAD": "ref\n"})
    write_tree(project, {"templates/page.html": "<p>\n", "static/app.js": "1\n"})  # data files are copied
    excludes = Settings.model_fields["reload_excludes"].get_default(call_default_factory=True)  # .*, *~, …
    made = take_snapshot({"pkg": project}, tmp_path / "gen-1", None, excludes=excludes)
    files, _ = tree(made.directory)
    expected = {"__init__.py", "main.py", "util.py", "sub/__init__.py", "sub/leaf.py", "data.json"}
    expected |= {"templates/page.html", "static/app.js"}
    assert set(made.manifest) == {f"pkg/{name}" for name in expected}
    assert {name for name in files if "__pycache__" not in name} == set(made.manifest)

    # A file that becomes a link to nothing is gone from the next snapshot, with nothing left in its place.
    (project / "sub" / "leaf.py").unlink()
    (project / "sub" / "leaf.py").symlink_to("nowhere.py")
    again = take_snapshot({"pkg": project}, tmp_path / "gen-2", None, previous=made, excludes=excludes)
    assert again.changes == SnapshotChanges(removed=frozenset({"pkg.sub.leaf"}))
    assert not (again.directory / "pkg" / "sub" / "leaf.py").exists()

    # Without any pattern the editor's regular files are copied, but a link to nothing still is not.
    every = take_snapshot({"pkg": project}, tmp_path / "gen-3", None)
    assert {"pkg/util.py~", "pkg/sub/.leaf.py.swp", "pkg/.git/HEAD"} <= set(every.manifest)
    assert not {"pkg/.#util.py", "pkg/sub/gone", "pkg/sub/leaf.py"} & set(every.manifest)


# ----- links made ahead (prepare_next) ------------------------------------------------------------


@pytest.mark.parametrize("racy", [True, False], ids=["hashed", "by-stat"])
def test_a_snapshot_takes_over_the_links_made_ahead_and_ends_as_one_made_without_them(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, racy: bool
) -> None:
    """Changed, added, removed and untouched files, a package gone whole: the same tree, the old one untouched."""
    if not racy:  # files just written are hashed (RACY_NS); without that window the stat alone decides
        monkeypatch.setattr(snapshot_module, "RACY_NS", 0)
    write_tree(project, {"gone/__init__.py": "", "gone/mod.py": "G = 1\n"})
    first = snap(project, tmp_path / "gen-1")
    old_files = tree(first.directory)
    prepared = prepare_next(first, tmp_path / "next-1")
    for relative in first.manifest:  # every file and its bytecode, the very same inodes
        assert inode(first, relative) == (prepared.directory / relative).stat().st_ino, relative
        if relative.endswith(".py"):
            copy = importlib.util.cache_from_source(str(prepared.directory / relative))
            assert bytecode(first, relative).stat().st_ino == os.stat(copy).st_ino, relative

    (project / "util.py").write_text("VALUE = 2\n")
    (project / "sub" / "leaf.py").unlink()
    (project / "sub" / "new.py").write_text("NEW = True\n")
    (project / "data.json").write_text('{"a": 1}\n')
    shutil.rmtree(project / "gone")
    os.utime(project / "main.py")  # touched only
    second = snap(project, tmp_path / "gen-2", first, prepared=prepared)
    plain = snap(project, tmp_path / "plain", first)

    assert second.linked_ahead_ms == prepared.took_ms and not prepared.directory.exists()  # taken over
    assert "; linked ahead in " in second.summary()
    assert tree(second.directory) == tree(plain.directory)
    assert not (second.directory / "pkg" / "gone").exists()  # an empty directory would import as a namespace
    assert (second.changes, second.shared, second.code_version, second.manifest) == (
        plain.changes,
        plain.shared,
        plain.code_version,
        plain.manifest,
    )
    assert inode(second, "pkg/main.py") == inode(first, "pkg/main.py")
    assert inode(second, "pkg/util.py") != inode(first, "pkg/util.py")
    assert tree(first.directory) == old_files  # nothing was written through a link


def test_links_made_ahead_of_another_snapshot_are_removed_and_not_used(project: Path, tmp_path: Path) -> None:
    first = snap(project, tmp_path / "gen-1")
    prepared = prepare_next(first, tmp_path / "next-1")
    (project / "util.py").write_text("VALUE = 2\n")
    second = snap(project, tmp_path / "gen-2", first)  # a reload that did not take them (a rollback came between)
    third = snap(project, tmp_path / "gen-3", second, prepared=prepared)  # util.py as in second, not as in first
    assert third.linked_ahead_ms is None and not prepared.directory.exists()
    assert "linked ahead" not in third.summary()
    assert (third.directory / "pkg" / "util.py").read_text() == "VALUE = 2\n"
    assert inode(third, "pkg/util.py") == inode(second, "pkg/util.py")


def test_a_file_that_became_a_directory_makes_the_snapshot_again_without_the_links_made_ahead(
    project: Path, tmp_path: Path
) -> None:
    first = snap(project, tmp_path / "gen-1")
    prepared = prepare_next(first, tmp_path / "next-1")
    (project / "data.json").unlink()
    write_tree(project, {"data.json/inside.txt": "x\n"})
    second = snap(project, tmp_path / "gen-2", first, prepared=prepared)
    assert (second.directory / "pkg" / "data.json" / "inside.txt").read_text() == "x\n"
    assert tree(second.directory) == tree(snap(project, tmp_path / "plain", first).directory)
    assert not prepared.directory.exists()


def test_links_refused_ahead_leave_nothing_behind(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = snap(project, tmp_path / "gen-1")
    link = os.link
    made: list[str] = []

    def refuse_the_third(source: Any, target: Any, *args: Any, **kwargs: Any) -> None:
        if len(made) == 2:
            raise OSError(errno.EMLINK, "Too many links", str(source))
        link(source, target)
        made.append(str(target))

    monkeypatch.setattr(os, "link", refuse_the_third)
    with pytest.raises(OSError, match="Too many links"):
        prepare_next(first, tmp_path / "next-1")
    assert len(made) == 2 and not (tmp_path / "next-1").exists()
    assert not any(Path(path).exists() for path in made)


# ----- with a real master -------------------------------------------------------------------------


def runtime_dir(parent: Path) -> Path:
    (found,) = [path for path in parent.iterdir() if path.name.startswith("pypnm-")]
    return found


def test_a_reload_links_what_did_not_change_and_serves_what_did(
    start_service: StartService, marker_app: Path, tmp_path: Path
) -> None:
    parent = tmp_path / "run"
    parent.mkdir()
    # No rollback window: the old snapshot goes as soon as its generation has drained.
    service = serve_marker(
        start_service, marker_app, graceful_timeout=5, PYPNM_RUNTIME_DIR=str(parent), PYPNM_ROLLBACK_WINDOW="0"
    )
    runtime = runtime_dir(parent)
    before = supervisor_status(service)
    old = runtime / f"gen-{before['generation']}" / "markerpkg"
    inodes = {name: (old / name).stat().st_ino for name in ("__init__.py", "main.py", "marker.py")}

    set_marker(marker_app, "v2")
    after = reload_by_sighup(service, before["generation"])
    assert after["last_reload"]["outcome"] == "succeeded", after["last_reload"]
    assert service.get("/marker").json()["marker"] == "v2"
    new = runtime / f"gen-{after['generation']}" / "markerpkg"
    assert (new / "__init__.py").stat().st_ino == inodes["__init__.py"]
    assert (new / "main.py").stat().st_ino == inodes["main.py"]
    assert (new / "marker.py").stat().st_ino != inodes["marker.py"]
    wait_until(lambda: "2 shared with the previous one, 1 modules changed" in service.output(), timeout=10)

    # The old generation drains and its snapshot goes; a worker of the new one that dies comes back from
    # the new snapshot, whose shared files are still whole.
    wait_until(lambda: not old.exists(), timeout=20)
    (worker,) = supervisor_status(service)["workers"]
    os.kill(worker["pid"], signal.SIGKILL)

    def replaced() -> dict[str, Any] | None:
        workers = supervisor_status(service)["workers"]
        return workers[0] if len(workers) == 1 and workers[0]["pid"] != worker["pid"] else None

    wait_until(replaced, timeout=30)
    answer = wait_until(lambda: service.get("/marker").json())
    assert answer["marker"] == "v2" and answer["pid"] != worker["pid"]

    # A broken file still fails the reload, named with its line, and the linked generation keeps serving.
    marker = marker_app / "markerpkg" / "marker.py"
    marker.write_text(marker.read_text() + "def broken(:\n    pass\n")
    bad_line = marker.read_text().count("\n") - 1
    failed = reload_by_sighup(service, after["generation"])["last_reload"]
    assert failed["outcome"] == "failed"
    for part in ("SyntaxError", str(marker), f"line {bad_line}"):
        assert part in failed["reason"], (part, failed["reason"])
    assert service.get("/marker").json()["marker"] == "v2"


PROBE_APP = """
import importlib

from pypnm.api.app import create_app

app = create_app()  # the pypnm service (its status and health) with one more route


@app.get("/probe")
def probe() -> dict[str, object]:
    found: dict[str, object] = {}
    for name in ("leaf", "gone", "sub"):
        try:
            found[name] = getattr(importlib.import_module(f"probepkg.{name}"), "VALUE", "no VALUE")
        except ImportError:
            found[name] = None
    return found
"""


def test_a_reload_takes_the_links_made_ahead_and_serves_changed_added_and_removed_files(
    start_service: StartService, tmp_path: Path
) -> None:
    """The links of the serving snapshot are made after each reload; the next one takes them and is exact."""
    parent, app = tmp_path / "run", tmp_path / "app"
    parent.mkdir()
    write_app_package(app, "probepkg", PROBE_APP)
    write_tree(
        app / "probepkg", {"leaf.py": "VALUE = 'v1'\n", "gone.py": "VALUE = 'g'\n", "sub/__init__.py": "VALUE = 's'\n"}
    )
    command = pypnm_command("--app", "probepkg.main:app", "--port", "{port}", "--workers", "1")
    env = base_env(PYPNM_RUNTIME_DIR=str(parent), PYPNM_RELOAD_MIN_INTERVAL="0")
    service = start_service(command, cwd=app, env=env)
    runtime = runtime_dir(parent)
    assert service.get("/probe").json() == {"leaf": "v1", "gone": "g", "sub": "s"}
    wait_until(lambda: list(runtime.glob("next-*/probepkg/main.py")), timeout=20)  # linked after the first reload

    (app / "probepkg" / "leaf.py").write_text("VALUE = 'v2'\n")
    (app / "probepkg" / "gone.py").unlink()
    shutil.rmtree(app / "probepkg" / "sub")
    (app / "probepkg" / "new.py").write_text("VALUE = 'n'\n")
    before = supervisor_status(service)
    after = reload_by_sighup(service, before["generation"])
    assert after["last_reload"]["outcome"] == "succeeded", after["last_reload"]
    assert service.get("/probe").json() == {"leaf": "v2", "gone": None, "sub": None}
    snapshot_line = wait_until(
        lambda: [
            line for line in service.output().splitlines() if f"snapshot of generation {after['generation']}:" in line
        ]
    )
    assert "shared with the previous one, 4 modules changed; linked ahead in " in snapshot_line[0], snapshot_line
    new = runtime / f"gen-{after['generation']}" / "probepkg"
    assert sorted(path.name for path in new.iterdir() if path.name != "__pycache__") == [
        "__init__.py",
        "leaf.py",
        "main.py",
        "new.py",
    ]
    old = runtime / f"gen-{before['generation']}" / "probepkg"  # kept for the rollback window, as it was
    assert (old / "leaf.py").read_text() == "VALUE = 'v1'\n" and (old / "sub" / "__init__.py").is_file()
    assert (new / "main.py").stat().st_ino == (old / "main.py").stat().st_ino
    wait_until(lambda: list(runtime.glob("next-*/probepkg/new.py")), timeout=20)  # and again for the next one
    assert [path.name for path in runtime.glob("next-*")] == ["next-2"]  # the one taken is gen-N now, no other


def test_a_file_that_is_not_a_regular_file_fails_the_snapshot_in_one_line(project: Path, tmp_path: Path) -> None:
    fifo = project / "pipe"
    os.mkfifo(fifo)  # a copy would block on it forever
    with pytest.raises(SnapshotError, match=rf"^cannot copy the code: {fifo}: not a regular file$"):
        snap(project, tmp_path / "gen-1")
    assert not (tmp_path / "gen-1").exists()


def test_a_lineage_replaces_removed_snapshots_by_links_to_its_newest_and_ends_with_no_links(
    project: Path, tmp_path: Path
) -> None:
    """Paths into a removed snapshot of a lineage lead to the newest one's files; once it ends, nothing is left."""
    runtime = tmp_path / "runtime"
    first = snap(project, runtime / "gen-1")
    second = snap(project, runtime / "gen-2", first)
    third = snap(project, runtime / "gen-3", second)
    kept_path = first.directory / "pkg" / "data.json"  # what a module imported from gen-1 computed at import
    lineage = Lineage()

    lineage.replace(first.directory, second.directory)
    assert first.directory.is_symlink() and kept_path.read_text() == "{}\n"
    assert os.path.realpath(first.directory) == str(second.directory.resolve())

    lineage.replace(second.directory, third.directory)  # both earlier names now lead to the newest
    for directory in (first.directory, second.directory):
        assert os.path.realpath(directory) == str(third.directory.resolve())
    assert kept_path.read_text() == "{}\n"
    assert sorted(path.name for path in runtime.iterdir() if not path.is_symlink()) == ["gen-3"]  # trees removed

    third.remove()
    lineage.end()
    assert list(runtime.iterdir()) == []


# ----- when the links are made: NextSnapshot, in a real event loop -----------------------------------


def two_snapshots_and_a_runtime(project: Path, tmp_path: Path) -> tuple[Snapshot, Snapshot, Path]:
    """Two snapshots of `project`, one after the other, and an empty runtime directory for the links."""
    first = snap(project, tmp_path / "gen-1")
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    return first, snap(project, tmp_path / "gen-2", first), runtime


def test_next_snapshot_links_after_its_wait_is_cancelled_by_an_early_reload_and_cleans_up(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(next_snapshot, "PREPARE_AFTER", 0.2)
    base, other, runtime = two_snapshots_and_a_runtime(project, tmp_path)

    def made() -> list[str]:
        return sorted(path.name for path in runtime.iterdir())

    async def until(names: list[str]) -> None:
        for _ in range(200):  # 10 s at most
            if made() == names:
                return
            await asyncio.sleep(0.05)
        assert made() == names

    async def scenario() -> None:
        ahead = next_snapshot.NextSnapshot(runtime)
        assert await ahead.take() is None  # nothing prepared yet

        ahead.prepare(base)
        ahead.reload_started()  # a reload within the wait: it links as it always did
        assert await ahead.take() is None
        await asyncio.sleep(0.4)
        assert made() == []  # and nothing is linked behind its back

        ahead.prepare(base)
        await until(["next-2"])
        ahead.prepare(base)  # a reload that failed before its snapshot: the links stay for the next one
        ahead.reload_started()  # made already: kept for the snapshot
        assert made() == ["next-2"]
        ahead.prepare(other)  # another snapshot serves (a rollback): the unused links go, new ones are made
        await until(["next-3"])
        prepared = await ahead.take()
        assert prepared is not None and prepared.base is other and prepared.directory == runtime / "next-3"
        assert await ahead.take() is None  # taken once

        ahead.prepare(base)
        await until(["next-3", "next-4"])
        ahead.discard()  # the master stops
        await until(["next-3"])  # the taken one is its snapshot's now, left alone

    asyncio.run(scenario())


def test_a_reload_that_starts_while_the_links_are_made_waits_for_them(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(next_snapshot, "PREPARE_AFTER", 0.0)
    base = snap(project, tmp_path / "gen-1")
    linking, go = threading.Event(), threading.Event()
    real = snapshot_module.prepare_next

    def held(*args: Any) -> Prepared:
        linking.set()
        assert go.wait(10)
        return real(*args)

    monkeypatch.setattr(next_snapshot, "prepare_next", held)

    async def scenario() -> Prepared | None:
        ahead = next_snapshot.NextSnapshot(tmp_path)
        ahead.prepare(base)
        assert await asyncio.to_thread(linking.wait, 10)
        threading.Timer(0.2, go.set).start()
        return await ahead.take()

    prepared = asyncio.run(scenario())
    assert prepared is not None and (prepared.directory / "pkg" / "util.py").read_text() == "VALUE = 1\n"


def test_links_discarded_while_they_are_made_neither_leak_nor_disturb_the_next_ones(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A rollback ends while the links of the replaced snapshot are being made: they go, and the new ones are used."""
    monkeypatch.setattr(next_snapshot, "PREPARE_AFTER", 0.0)
    first, second, runtime = two_snapshots_and_a_runtime(project, tmp_path)
    entered = {id(first): threading.Event(), id(second): threading.Event()}
    release = {id(first): threading.Event(), id(second): threading.Event()}
    real = snapshot_module.prepare_next

    def held(base: Snapshot, directory: Path) -> Prepared:
        entered[id(base)].set()
        assert release[id(base)].wait(10)
        return real(base, directory)

    monkeypatch.setattr(next_snapshot, "prepare_next", held)

    async def scenario() -> Prepared | None:
        ahead = next_snapshot.NextSnapshot(runtime)
        ahead.prepare(first)
        assert await asyncio.to_thread(entered[id(first)].wait, 10)
        ahead.prepare(second)  # the first's links are still being made
        assert await asyncio.to_thread(entered[id(second)].wait, 10)
        release[id(first)].set()  # the first's thread ends while the second's is making links
        await asyncio.sleep(0.3)
        ahead.reload_started()
        threading.Timer(0.3, release[id(second)].set).start()
        return await ahead.take()  # waits for the second's links

    prepared = asyncio.run(scenario())
    assert prepared is not None and prepared.base is second and prepared.directory == runtime / "next-2"
    assert sorted(path.name for path in runtime.iterdir()) == ["next-2"]  # the first's links removed


def test_no_links_are_made_ahead_when_the_bytecode_is_kept_outside_the_tree(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = snap(project, tmp_path / "gen-1")
    monkeypatch.setattr(sys, "pycache_prefix", str(tmp_path / "pycache"))
    with pytest.raises(OSError, match="PYTHONPYCACHEPREFIX"):
        prepare_next(first, tmp_path / "next-1")
    assert not (tmp_path / "next-1").exists()


@pytest.mark.parametrize("change", ["module-to-package", "package-to-module", "single-module"])
def test_links_made_ahead_follow_a_module_that_becomes_a_package_and_back(
    project: Path, tmp_path: Path, change: str
) -> None:
    if change == "single-module":
        module = write_tree(tmp_path / "single", {"app.py": "A = 1\n"}) / "app.py"
        first = take_snapshot({"app": module}, tmp_path / "gen-1", None)
        prepared = prepare_next(first, tmp_path / "next-1")
        module.write_text("A = 22\n")
        second = take_snapshot({"app": module}, tmp_path / "gen-2", None, previous=first, prepared=prepared)
        plain = take_snapshot({"app": module}, tmp_path / "plain", None, previous=first)
    else:
        if change == "package-to-module":
            (project / "util.py").unlink()
            write_tree(project, {"util/__init__.py": "VALUE = 1\n"})
        first = snap(project, tmp_path / "gen-1")
        prepared = prepare_next(first, tmp_path / "next-1")
        if change == "module-to-package":
            (project / "util.py").unlink()
            write_tree(project, {"util/__init__.py": "VALUE = 2\n"})
        else:
            shutil.rmtree(project / "util")
            (project / "util.py").write_text("VALUE = 2\n")
        second = snap(project, tmp_path / "gen-2", first, prepared=prepared)
        plain = snap(project, tmp_path / "plain", first)
    assert second.linked_ahead_ms is not None
    assert tree(second.directory) == tree(plain.directory)
    assert second.manifest == plain.manifest
