"""The import graph the master reads from a snapshot's sources, and the plan it makes of it (no processes)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pypnm.supervisor import import_graph
from pypnm.supervisor.import_graph import CodeScan, ImportScanner, Plan, module_name, plan, read_imports
from pypnm.supervisor.snapshot import Snapshot, SnapshotChanges, take_snapshot


class Snapshots:
    """Successive snapshots of a project written from file contents, each sharing with the one before."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.count = 0
        self.previous: Snapshot | None = None
        self.scanner = ImportScanner()

    def take(self, files: dict[str, str], config: str | None = None) -> Snapshot:
        self.count += 1
        root = self.tmp_path / f"src-{self.count}"
        for name, text in files.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        config_file = None
        if config is not None:
            config_file = root / "settings.toml"
            config_file.write_text(config)
        tops = {name.split("/")[0] for name in files}
        sources = {top: root / top for top in sorted(tops)}
        self.previous = take_snapshot(sources, self.tmp_path / f"snap-{self.count}", config_file, None, self.previous)
        return self.previous

    def scan(self, files: dict[str, str], config: str | None = None) -> CodeScan:
        return self.scanner.scan(self.take(files, config))


APP = {
    "app/__init__.py": "",
    "app/main.py": "from . import routes\nfrom .models import Item\n",
    "app/routes/__init__.py": "from .items import router\n",
    "app/routes/items.py": "from ..models import Item\nrouter = [Item]\n",
    "app/models.py": "class Item: ...\n",
    "app/tools.py": "def lazy():\n    from app import models\n",
}


def test_module_names_come_from_paths() -> None:
    assert module_name("app/routes/items.py") == "app.routes.items"
    assert module_name("app/__init__.py") == "app"
    assert module_name("app/data.json") is None
    assert module_name("app/fast.cpython-311-x86_64-linux-gnu.so") is None


def test_relative_imports_resolve_and_parents_count() -> None:
    facts = read_imports("app.routes.items", False, b"from ..models import Item\nfrom . import other\n")
    assert facts.imports == {"app.models", "app.models.Item", "app.routes", "app.routes.other"}
    assert facts.dynamic is None
    # `import a.b.c` binds `a`: it holds the packages too; `from a.b import c` does not hold `a`.
    assert read_imports("x", False, b"import a.b.c\n").imports == {"a", "a.b", "a.b.c"}
    assert read_imports("x", False, b"from a.b import c\n").imports == {"a.b", "a.b.c"}
    literal = read_imports("app.x", False, b"import importlib\nm = importlib.import_module('app.models')\n")
    assert "app.models" in literal.imports and literal.dynamic is None
    computed = read_imports("app.x", False, b"import importlib\n\n\nm = importlib.import_module('app.' + 'm')\n")
    assert computed.dynamic == 4


def test_a_change_drops_its_importers_transitively(tmp_path: Path) -> None:
    snapshots = Snapshots(tmp_path)
    old = snapshots.scan(APP)
    new = snapshots.scan({**APP, "app/models.py": "class Item:\n    x = 1\n"})
    # models <- routes.items <- routes (package) <- main; tools imports models inside a function.
    assert plan(old, new, "app.main") == Plan(["app.main", "app.models", "app.routes", "app.routes.items", "app.tools"])
    leaf = snapshots.scan({**APP, "app/tools.py": "def lazy():\n    return 1\n"})
    assert plan(old, leaf, "app.main") == Plan(["app.tools"])
    assert plan(old, old, "app.main") == Plan([])


def test_a_dropped_package_keeps_the_submodules_that_do_not_import_from_it(tmp_path: Path) -> None:
    snapshots = Snapshots(tmp_path)
    old = snapshots.scan(APP)
    new = snapshots.scan({**APP, "app/routes/__init__.py": "from .items import router\n#\n"})
    assert plan(old, new, "app.main") == Plan(["app.main", "app.routes"])


def test_what_the_graph_cannot_vouch_for_is_a_clean_import(tmp_path: Path) -> None:
    snapshots = Snapshots(tmp_path)
    old = snapshots.scan({**APP, "app/fast.so": "v1"})
    so = snapshots.scan({**APP, "app/fast.so": "v2"})
    assert plan(old, so, "app.main") == Plan.clean("app/fast.so changed, which is not a Python module")

    dynamic = {**APP, "app/main.py": APP["app/main.py"] + "import importlib\nX = importlib.import_module(NAME)\n"}
    old = snapshots.scan(dynamic)
    new = snapshots.scan({**dynamic, "app/tools.py": "\n"})
    assert plan(old, new, "app.main") == Plan.clean(
        "a dynamic import in app/main.py, line 4, which the import graph cannot follow"
    )
    # The same dynamic import in a module that is imported again anyway is no obstacle.
    changed = snapshots.scan({**dynamic, "app/main.py": dynamic["app/main.py"] + "#\n"})
    assert plan(old, changed, "app.main") == Plan(["app.main"])

    # The settings file the app reads as it is built is frozen beside the code: a change to it is a clean import.
    old = snapshots.scan(APP, config="workers = 2\n")
    config = snapshots.scan(APP, config="workers = 3\n")
    assert plan(old, config, "app.main") == Plan.clean("settings.toml changed, which is not a Python module")
    assert plan(config, snapshots.scan(APP, config="workers = 3\n"), "app.main") == Plan([])


@pytest.mark.parametrize(
    ("source", "line"),
    [
        # import_module and __import__ under another name, or passed on.
        ('from importlib import import_module as load\nBETA = load("app.plugins." + "beta")\n', 2),
        ('import importlib as il\n\nBETA = il.import_module(f"app.{NAME}")\n', 3),
        ("import importlib\nload = importlib.import_module\n", 2),
        ("from importlib import import_module\nPLUGINS = list(map(import_module, NAMES))\n", 2),
        ("import builtins\nload = builtins.__import__\n", 2),
        ("from importlib import reload as again\nagain(MODULE)\n", 2),
        # Loading by file path, or running a module: any use of the loaders, whatever their arguments.
        (
            "import importlib.util\n\n"
            'spec = importlib.util.spec_from_file_location("gamma", PATH)\n'
            "mod = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(mod)\n",
            3,
        ),
        ('from importlib.machinery import SourceFileLoader as Loader\nmod = Loader("gamma", PATH).load_module()\n', 1),
        ('import runpy\nGLOBALS = runpy.run_path("plugins/gamma.py")\n', 2),
        ('def run():\n    import runpy\n    runpy.run_module("app.tools")\n', 3),
    ],
)
def test_dynamic_imports_under_other_names_and_loads_by_path_are_seen(source: str, line: int) -> None:
    assert read_imports("app.main", False, source.encode()).dynamic == line


def test_an_aliased_import_function_with_a_literal_is_an_edge() -> None:
    facts = read_imports("app.main", False, b'from importlib import import_module as load\nX = load("app.models")\n')
    assert facts == import_graph.ModuleFacts(frozenset({"importlib", "importlib.import_module", "app.models"}), None)
    # A method that happens to be called `reload`, used but not called, is not an import.
    assert read_imports("app.main", False, b"callback = config.reload\n").dynamic is None


def test_a_file_no_import_can_name_is_not_a_module_to_the_snapshot_nor_to_the_plan(tmp_path: Path) -> None:
    snapshots = Snapshots(tmp_path)
    old = snapshots.scan({**APP, "app/run-me.py": "A = 1\n"})
    new = snapshots.scan({**APP, "app/run-me.py": "A = 2\n"})
    assert snapshots.previous is not None
    assert snapshots.previous.changes == SnapshotChanges(other=frozenset({"app/run-me.py"}))
    assert plan(old, new, "app.main") == Plan.clean("app/run-me.py changed, which is not a Python module")


def test_only_new_content_is_read_and_parsed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parsed: list[str] = []

    def spy(module: str, is_package: bool, source: bytes) -> import_graph.ModuleFacts:
        parsed.append(module)
        return read_imports(module, is_package, source)

    monkeypatch.setattr(import_graph, "read_imports", spy)
    snapshots = Snapshots(tmp_path)
    old = snapshots.scan(APP)
    assert sorted(parsed) == sorted(str(module_name(name)) for name in APP)
    parsed.clear()
    new = snapshots.scan({**APP, "app/models.py": "class Item:\n    x = 1\n"})
    assert parsed == ["app.models"]
    # The digests are the snapshot's own: the scan agrees with the snapshot on what changed.
    assert snapshots.previous is not None and snapshots.previous.changes is not None
    assert {name for name in new.modules if new.files[new.paths[name]] != old.files[old.paths[name]]} == set(
        snapshots.previous.changes.changed
    )
