"""`GET /metrics` and the middleware that counts every request, with prometheus-client.

Under the supervisor every worker writes its request counts to prometheus-client's
multiprocess directory (the master's, named by `PROMETHEUS_MULTIPROC_DIR`: see
pypnm.metrics), and `/metrics` sums the files of every process of every generation, the
master's own counters and the archives of dead workers included, so no number goes back
when a reload swaps workers or a worker is respawned. What serves now (`pypnm_generation`,
`pypnm_workers{state}`) is asked of the master's status at scrape time, and
`pypnm_build_info` is the identity of the code that answered. Under a plain uvicorn
(no directory) `/metrics` shows this process's own requests.

The middleware is hand-written rather than taken from prometheus-fastapi-instrumentator or
starlette-exporter: the families and labels are fixed (`route` = the route template), the
route must also be found for requests that the System Operations guard or CORS answer before
any routing (they would count as unmatched there), and the cost per request must stay small
(see below). The route template comes from `scope["route"]` where the router set it, else
from matching the path against every route template; a path that no route serves counts as
`<unmatched>` and an unknown method as `<other>`, so clients cannot add label values.

Counting is batched: a request only adds to plain dicts of this process (`_Pending`), and
those are written to prometheus-client's metrics (in multiprocess mode, to this worker's files)
at most FLUSH_INTERVAL later, before every scrape this worker answers, and at lifespan
shutdown, after the worker's last request. Writing each request through would cost five
file-backed writes per request (counter, two for the histogram, two for the in-progress
gauge), measured at 10-15 % of the capacity on a cheap route; batched, a worker writes each
label set at most once a second. A worker killed with `kill -9` loses what it counted in its
last FLUSH_INTERVAL: counts that no scrape had shown, so no number goes back. The batched
histogram is written into the histogram's bucket and sum values directly (`_buckets`, `_sum`):
prometheus-client has no public call to add n observations to one bucket.

`/metrics` is a System Operation: pypnm.api.access guards it like `/pypnm/system/`.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import os
import re
import time
from collections import Counter as Tally
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool
from starlette.routing import BaseRoute, compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pypnm import metrics as names
from pypnm.api.middleware import StatusRecorder
from pypnm.identity import SUPERVISOR_ENV, ProcessIdentity
from pypnm.supervisor import control
from pypnm.supervisor.protocol import StatusAnswer, StatusRequest
from pypnm.supervisor.timeouts import METRICS_STATUS

logger = logging.getLogger("pypnm.metrics")

METRICS_PATH = "/metrics"
# The classic text format, which every Prometheus version reads (prometheus-client's newest default may not be).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds a worker keeps its counts before writing them out (other workers' scrapes see them then).
FLUSH_INTERVAL = 1.0

# This process's families. Without the supervisor they are exposed from here; under it their
# values live in this process's files of the multiprocess directory, and a scrape reads those.
_registry = CollectorRegistry()
REQUESTS = Counter(
    names.HTTP_REQUESTS,
    "HTTP requests answered, by method, route template and status",
    ["method", "route", "status"],
    registry=_registry,
)
DURATION = Histogram(
    names.HTTP_REQUEST_DURATION,
    "Seconds from a request's arrival to the end of its response, by route template",
    ["method", "route"],
    buckets=names.HTTP_BUCKETS,
    registry=_registry,
)
# livesum: the requests in progress in the live processes; a dead worker's file is removed by the master.
IN_PROGRESS = Gauge(
    names.HTTP_IN_PROGRESS, "HTTP requests being answered now", multiprocess_mode="livesum", registry=_registry
)


class _Pending:
    """This process's counts since the last flush; only the event loop's thread touches them."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        # (method, route) -> a count per bucket (HTTP_BUCKETS, then +Inf), then the sum of the durations.
        self.durations: dict[tuple[str, str], list[float]] = {}
        self.in_progress = 0
        self._written_in_progress = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    def started(self) -> None:
        self.in_progress += 1
        self._schedule()

    def finished(self, method: str, route: str, status: int, elapsed: float) -> None:
        self.in_progress -= 1
        key = (method, route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        slots = self.durations.get((method, route))
        if slots is None:
            slots = self.durations[(method, route)] = [0.0] * (len(names.HTTP_BUCKETS) + 2)
        slots[bisect.bisect_left(names.HTTP_BUCKETS, elapsed)] += 1  # the first bucket whose bound is >= elapsed
        slots[-1] += elapsed
        self._schedule()

    def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        if self._timer is None or self._timer_loop is not loop:  # a loop that ended took its timer along
            self._timer = loop.call_later(FLUSH_INTERVAL, self.flush)
            self._timer_loop = loop

    def flush(self) -> None:
        """Write the counts out: to this process's files under the supervisor, else to its registry."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        requests, self.requests = self.requests, {}
        durations, self.durations = self.durations, {}
        for (method, route, status), count in requests.items():
            REQUESTS.labels(method, route, str(status)).inc(count)
        for (method, route), slots in durations.items():
            histogram = DURATION.labels(method, route)
            for bucket, observed in zip(histogram._buckets, slots[:-1], strict=True):
                if observed:
                    bucket.inc(observed)
            histogram._sum.inc(slots[-1])
        if self.in_progress != self._written_in_progress:
            IN_PROGRESS.set(self.in_progress)
            self._written_in_progress = self.in_progress


_pending = _Pending()


class MetricsMiddleware:
    """Pure ASGI: counts and times every HTTP request by method, route template and status."""

    def __init__(self, app: ASGIApp, routes: list[BaseRoute], openapi: Callable[[], dict[str, Any]]) -> None:
        self.app = app
        self.routes = routes
        self.openapi = openapi
        self._table: list[tuple[re.Pattern[str], str]] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, self._flush_at_shutdown(receive), send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        recorder = StatusRecorder(send)
        path, root_path = scope["path"], scope.get("root_path", "")  # a mount rewrites them on the way in
        started = time.perf_counter()
        _pending.started()
        try:
            await self.app(scope, receive, recorder)
        finally:
            method = scope["method"] if scope["method"] in names.KNOWN_METHODS else names.OTHER_METHOD
            _pending.finished(
                method, self.route_of(scope, path, root_path), recorder.status, time.perf_counter() - started
            )

    @staticmethod
    def _flush_at_shutdown(receive: Receive) -> Receive:
        """The lifespan's receive, writing the counts out when shutdown begins (every request has ended)."""

        async def receive_and_flush() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                _pending.flush()
            return message

        return receive_and_flush

    def route_of(self, scope: Scope, path: str, root_path: str) -> str:
        """The template of the route that served (or would have served) the request, else `<unmatched>`.

        The router leaves the route it chose in `scope["route"]` for the app's own routes. Requests
        answered before routing (System Operations guard, CORS preflight), mounts (the docs' assets)
        and paths no route serves are looked up in `_templates`, by the path as it came in.
        """
        template = getattr(scope.get("route"), "path_format", None)
        if isinstance(template, str):
            return template
        if root_path and path.startswith(root_path):
            path = path[len(root_path) :] or "/"
        return next((template for regex, template in self._templates() if regex.match(path)), names.UNMATCHED_ROUTE)

    def _templates(self) -> list[tuple[re.Pattern[str], str]]:
        """Every route template with its pattern, in routing order, made at first use.

        From the OpenAPI document, because FastAPI keeps included routers' routes behind objects of
        its own (no public way to list them), and from the app's top-level routes (mounts, and
        routes left out of the document).
        """
        if self._table is None:
            table = [(compile_path(template)[0], template) for template in self.openapi().get("paths", {})]
            for route in self.routes:
                template, regex = getattr(route, "path_format", None), getattr(route, "path_regex", None)
                if isinstance(template, str) and isinstance(regex, re.Pattern):
                    table.append((regex, template))
            self._table = table
        return self._table


class _Scrape(Collector):
    """Everything one `/metrics` answer shows."""

    def __init__(self, directory: Path | None, supervisor: dict[str, Any] | None, identity: ProcessIdentity) -> None:
        self.directory = directory
        self.supervisor = supervisor
        self.identity = identity

    def collect(self) -> Iterable[Metric]:
        if self.directory is None:
            yield from _registry.collect()
        else:
            with names.reading(self.directory):  # the master does not swap files in or out meanwhile
                files = names.value_files(self.directory)
                families = list(MultiProcessCollector.merge(files, accumulate=True))
            yield from families
            yield GaugeMetricFamily(
                names.METRICS_FILES, "Files in the metrics directory that this scrape read", value=len(files)
            )
        build = GaugeMetricFamily(
            names.BUILD_INFO,
            "The code that answered: pypnm version and code_version",
            labels=["version", "code_version"],
        )
        build.add_metric([self.identity.version, self.identity.code_version], 1)
        yield build
        if self.supervisor is None:
            return
        if self.supervisor.get("generation") is not None:
            yield GaugeMetricFamily(names.GENERATION, "The generation serving", value=self.supervisor["generation"])
        states = Tally(str(worker.get("state")) for worker in self.supervisor.get("workers", []))
        workers = GaugeMetricFamily(names.WORKERS, "Live workers, by state", labels=["state"])
        for state in names.WORKER_STATES:
            workers.add_metric([state], states.get(state, 0))
        yield workers


async def _supervisor_status() -> dict[str, Any] | None:
    socket_path = os.environ.get(SUPERVISOR_ENV)
    if not socket_path:
        return None
    try:
        answer = await control.ask(socket_path, StatusRequest(), StatusAnswer, timeout=METRICS_STATUS)
        return answer.status
    except (control.ControlError, OSError, ValueError) as exc:
        logger.warning(
            "metrics: the supervisor did not answer (%s): answering without %s and %s",
            str(exc) or type(exc).__name__,
            names.GENERATION,
            names.WORKERS,
        )
        return None


async def serve_metrics(request: Request) -> Response:
    """Every counter of every worker of every generation and of the master, in Prometheus text format."""
    _pending.flush()  # this worker's own counts are current; the others' are at most FLUSH_INTERVAL old
    scrape = _Scrape(names.directory(), await _supervisor_status(), request.app.state.identity)
    body = await run_in_threadpool(generate_latest, scrape)  # reads files: off the event loop
    return Response(body, media_type=CONTENT_TYPE)


def add_metrics(app: FastAPI) -> None:
    """Count every request of `app` and serve `GET /metrics`."""
    app.add_api_route(
        METRICS_PATH,
        serve_metrics,
        methods=["GET"],
        response_class=PlainTextResponse,
        tags=["Metrics"],
        summary="Prometheus metrics of the whole service",
    )
    app.add_middleware(MetricsMiddleware, routes=app.router.routes, openapi=app.openapi)
