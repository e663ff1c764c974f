"""Generate the reload benchmark's large app: a package shaped like a real PyPNM service.

`bigpkg/` holds `--modules` route modules (`bigpkg/routes/mNNN.py`), each with two
pydantic models and two routes, importing numpy and pandas; every tenth one also builds a
pandas DataFrame at import and serves a route that computes on it. `bigpkg/common.py` is
the helper module they all import, and `bigpkg/app.py` builds the FastAPI app from every
router. `GET /` answers `{"code": MARKER}` with the `MARKER` of `bigpkg/routes/m000.py`:
the benchmark rewrites that line, so each reload changes exactly one module.

Generated, not committed: hundreds of near-identical files would only blur the history.

    python bench/bigapp.py /tmp/big              # writes /tmp/big/bigpkg, 200 route modules
    python bench/bigapp.py /tmp/big --modules 400
    python bench/bigapp.py /tmp/big --time       # and how long importing it takes, on top of its libraries
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

PACKAGE = "bigpkg"
APP_SPEC = f"{PACKAGE}:app"
MARKER_MODULE = Path(PACKAGE) / "routes" / "m000.py"  # the file whose MARKER line the benchmark rewrites
DEFAULT_MODULES = 200
FIELDS = 3  # fields per model: sets how long importing a route module takes

COMMON = '''"""Helpers every route module imports."""

from __future__ import annotations

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field


class Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid")

    module: str
    status: str = Field(default="ok", pattern="^(ok|partial|error)$")


def summarize(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        return {"count": 0.0, "mean": 0.0, "std": 0.0}
    return {"count": float(array.size), "mean": float(array.mean()), "std": float(array.std())}


def frame(rows: int, seed: int) -> pd.DataFrame:
    generator = np.random.default_rng(seed)
    return pd.DataFrame({"group": np.arange(rows) % 8, "value": generator.normal(size=rows)})
'''

ROUTE = '''"""Route module {n} of the generated benchmark app."""

from __future__ import annotations

import numpy as np
import pandas as pd
from fastapi import APIRouter, HTTPException, Query
from pydantic import BaseModel, Field

from {package}.common import Envelope, frame, summarize

{marker}router = APIRouter(prefix="/m{n}", tags=["m{n}"])
WINDOW = np.hanning({window})


class Query{n}(BaseModel):
{query_fields}


class Result{n}(Envelope):
{result_fields}


@router.post("/compute", response_model=Result{n})
async def compute_{n}(body: Query{n}) -> Result{n}:
    if not body.values:
        raise HTTPException(status_code=422, detail="values must not be empty")
    stats = summarize([value * body.scale for value in body.values])
    return Result{n}(module="m{n}", count=int(stats["count"]), mean=stats["mean"], std=stats["std"])


@router.get("/info")
async def info_{n}(limit: int = Query(10, ge=1, le=100)) -> dict[str, object]:
    series = pd.Series(WINDOW[:limit])
    return {{"module": "m{n}", "limit": limit, "sum": float(series.sum())}}
{heavy}'''

HEAVY = """

FRAME = frame(512, {seed})  # pandas work at import, as a real module's lookup tables


@router.get("/stats")
async def stats_{n}() -> dict[str, float]:
    means = FRAME.groupby("group")["value"].mean()
    spectrum = np.abs(np.fft.rfft(FRAME["value"].to_numpy()))
    return {{**{{str(key): round(float(value), 6) for key, value in means.items()}}, "peak": float(spectrum.max())}}
"""

APP = '''"""The generated benchmark app: every route module's router, and GET / with m000's MARKER."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI

from {package}.routes import {imports}

app = FastAPI(title="pypnm reload benchmark: large app", docs_url=None, redoc_url=None, openapi_url=None)
for module in ({imports},):
    app.include_router(module.router)


@app.get("/")
async def root() -> dict[str, str]:
    return {{"code": m000.MARKER}}


@app.get("/slow")
async def slow(s: float = 2.0) -> dict[str, str | float]:
    seconds = min(max(s, 0.0), 30.0)
    await asyncio.sleep(seconds)
    return {{"code": m000.MARKER, "slept": seconds}}
'''

KINDS = ("str", "int", "float", "bool", "list[int]", "dict[str, str]", "str | None", "float | None")
DEFAULTS = {
    "str": '""',
    "int": "0",
    "float": "0.0",
    "bool": "False",
    "list[int]": "Field(default_factory=list, max_length=64)",
    "dict[str, str]": "Field(default_factory=dict)",
    "str | None": "None",
    "float | None": "None",
}


def _fields(n: int, prefix: str, required: list[str]) -> str:
    lines = [f"    {line}" for line in required]
    for i in range(FIELDS):
        kind = KINDS[(n + i) % len(KINDS)]
        lines.append(f"    {prefix}_{i}: {kind} = {DEFAULTS[kind]}")
    return "\n".join(lines)


def route_module(index: int, marker: str | None) -> str:
    n = f"{index:03d}"
    return ROUTE.format(
        n=n,
        package=PACKAGE,
        marker=f'MARKER = "{marker}"  # rewritten by reload_bench.py\n' if marker is not None else "",
        window=64 + index % 64,
        query_fields=_fields(
            index,
            "option",
            ["values: list[float] = Field(default_factory=list, max_length=1000)", "scale: float = 1.0"],
        ),
        result_fields=_fields(index, "extra", ["count: int", "mean: float", "std: float"]),
        heavy=HEAVY.format(n=n, seed=index) if index % 10 == 0 else "",
    )


def generate(root: Path, modules: int = DEFAULT_MODULES, marker: str = "r000") -> Path:
    """Write `root/bigpkg` (root is created; bigpkg must not exist yet); returns the package directory."""
    package = root / PACKAGE
    routes = package / "routes"
    routes.mkdir(parents=True)
    (package / "__init__.py").write_text('from .app import app\n\n__all__ = ["app"]\n')
    (package / "common.py").write_text(COMMON)
    (routes / "__init__.py").write_text("")
    names = [f"m{index:03d}" for index in range(modules)]
    for index, name in enumerate(names):
        (routes / f"{name}.py").write_text(route_module(index, marker if index == 0 else None))
    (package / "app.py").write_text(APP.format(package=PACKAGE, imports=", ".join(names)))
    return package


# Run in a fresh interpreter: the libraries first, then the app, each timed.
_TIMING = """
import sys, time
sys.path.insert(0, sys.argv[1])
start = time.perf_counter()
import fastapi, pydantic, numpy, pandas
libraries = time.perf_counter()
import {package}
done = time.perf_counter()
print(f"{{(libraries - start) * 1000:.0f}} {{(done - libraries) * 1000:.0f}}")
"""


def import_times(root: Path) -> tuple[float, float]:
    """(ms to import fastapi, pydantic, numpy and pandas; ms to import the app on top), in a fresh interpreter."""
    result = subprocess.run(
        [sys.executable, "-B", "-c", _TIMING.format(package=PACKAGE), str(root)],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    libraries, app = result.stdout.split()
    return float(libraries), float(app)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("root", type=Path, help="directory to write bigpkg/ into")
    parser.add_argument("--modules", type=int, default=DEFAULT_MODULES, help="route modules (default 200)")
    parser.add_argument("--time", action="store_true", help="then time importing it (3 fresh interpreters)")
    args = parser.parse_args()
    if not 1 <= args.modules <= 1000:
        parser.error("--modules must be between 1 and 1000")
    if (args.root / PACKAGE).exists():
        parser.error(f"{args.root / PACKAGE} exists already")
    package = generate(args.root, args.modules)
    print(f"wrote {package} ({args.modules} route modules); serve it as {APP_SPEC} from {args.root}")
    if args.time:
        for _ in range(3):
            libraries, app = import_times(args.root)
            print(f"import: fastapi+pydantic+numpy+pandas {libraries:.0f} ms, then the app {app:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
