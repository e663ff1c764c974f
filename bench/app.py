"""The reload benchmark's test app: every response says which version of the code produced it.

`bench/reload_bench.py` copies this file into a scratch package per server and, before
each reload, rewrites the `MARKER = "..."` line below (and nothing else) with a new
version, so the client can tell old code from new code response by response.
"""

from __future__ import annotations

import asyncio

from fastapi import FastAPI

MARKER = "r000"  # rewritten by reload_bench.py; keep it on one line, in double quotes

MAX_SLEEP = 30.0

app = FastAPI(title="pypnm reload benchmark app", docs_url=None, redoc_url=None, openapi_url=None)


@app.get("/")
async def root() -> dict[str, str]:
    return {"code": MARKER}


@app.get("/slow")
async def slow(s: float = 2.0) -> dict[str, str | float]:
    """A long request, to see what a reload does to work in flight."""
    seconds = min(max(s, 0.0), MAX_SLEEP)
    await asyncio.sleep(seconds)
    return {"code": MARKER, "slept": seconds}
