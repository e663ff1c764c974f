"""The import graph the master reads from a snapshot's sources, and the plan it makes of it (no processes)."""

from __future__ import annotations

from pathlib import Path

from pypnm.supervisor.import_graph import ImportScanner, Plan, module_name, plan, read_imports


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


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
    scanner = ImportScanner()
    old = scanner.scan(write(tmp_path / "1", APP), ["app"])
    new = scanner.scan(write(tmp_path / "2", {**APP, "app/models.py": "class Item:\n    x = 1\n"}), ["app"])
    # models <- routes.items <- routes (package) <- main; tools imports models inside a function.
    assert plan(old, new, "app.main") == Plan(["app.main", "app.models", "app.routes", "app.routes.items", "app.tools"])
    leaf = scanner.scan(write(tmp_path / "3", {**APP, "app/tools.py": "def lazy():\n    return 1\n"}), ["app"])
    assert plan(old, leaf, "app.main") == Plan(["app.tools"])
    assert plan(old, old, "app.main") == Plan([])


def test_a_dropped_package_keeps_the_submodules_that_do_not_import_from_it(tmp_path: Path) -> None:
    scanner = ImportScanner()
    old = scanner.scan(write(tmp_path / "1", APP), ["app"])
    new = scanner.scan(
        write(tmp_path / "2", {**APP, "app/routes/__init__.py": "from .items import router\n#\n"}), ["app"]
    )
    assert plan(old, new, "app.main") == Plan(["app.main", "app.routes"])


def test_what_the_graph_cannot_vouch_for_is_a_clean_import(tmp_path: Path) -> None:
    scanner = ImportScanner()
    old = scanner.scan(write(tmp_path / "1", {**APP, "app/fast.so": "v1"}), ["app"])
    so = scanner.scan(write(tmp_path / "2", {**APP, "app/fast.so": "v2"}), ["app"])
    assert plan(old, so, "app.main") == Plan.clean("app/fast.so changed, which is not a Python module")

    dynamic = {**APP, "app/main.py": APP["app/main.py"] + "import importlib\nX = importlib.import_module(NAME)\n"}
    old = scanner.scan(write(tmp_path / "3", dynamic), ["app"])
    new = scanner.scan(write(tmp_path / "4", {**dynamic, "app/tools.py": "\n"}), ["app"])
    assert plan(old, new, "app.main") == Plan.clean(
        "a dynamic import in app/main.py, line 4, which the import graph cannot follow"
    )
    # The same dynamic import in a module that is imported again anyway is no obstacle.
    changed = scanner.scan(write(tmp_path / "5", {**dynamic, "app/main.py": dynamic["app/main.py"] + "#\n"}), ["app"])
    assert plan(old, changed, "app.main") == Plan(["app.main"])
