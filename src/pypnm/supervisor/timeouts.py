"""Every fixed timeout and grace period of the supervisor's processes, each with the reason for its value.

The operator's timeouts are settings (`graceful_timeout`, `reload_timeout`,
`timeout_request_header`, ...). These are the ones nobody should have to tune: each bounds
a step that normally takes milliseconds, so that a hung peer costs seconds, not forever.
Seconds throughout.
"""

from __future__ import annotations

# ----- master <-> fork template -----------------------------------------------------------------
# The template imports the whole third-party stack before it says hello; on a cold machine (no
# .pyc yet, slow disk) that has taken tens of seconds, and nothing can serve before it anyway.
TEMPLATE_START = 60.0
# A fork answers within milliseconds; no answer in this time means the template hangs.
SPAWN_ANSWER = 10.0
# A standby (template.py) drops modules and collects before it says ready: milliseconds, a few
# tenths of a second niced on a busy machine for a full collection. Nothing waits for it but the
# standby itself: one that is not ready in this time is stopped, and the next reload forks as usual.
STANDBY_READY = 30.0
# The template exits as soon as it reads end-of-file; one still there after this is killed.
TEMPLATE_STOP = 5.0
# Locating the project's sources asks a fresh interpreter (snapshot.py): an import of the
# package's parents only, but on a loaded machine a cold interpreter start can take seconds.
LOCATE_SOURCES = 30.0

# ----- master <-> workers -----------------------------------------------------------------------
# Validated workers only open their servers on the listeners: milliseconds. A candidate that
# does not accept within this is discarded, and the serving generation stays.
START_ACCEPTING = 10.0
# A worker stops accepting as soon as it reads the command, and says so; the swap waits this long
# for that answer only: the drain that follows sends SIGTERM to every worker anyway.
STOP_ACCEPTING = 2.0
# The workers of a generation closed early (max_draining_generations) get this long to report,
# cut their connections and exit, lifespan shutdown included, before they are killed.
CLOSE_GRACE = 3.0
# A killed process is gone within milliseconds; the wait is bounded anyway so that one stuck in
# the kernel (uninterruptible I/O) cannot hold up a stop or a swap.
AFTER_KILL = 5.0
# A worker that keeps dying is replaced after 0.1 s, 0.2 s, 0.4 s ... at most this: fast for a
# one-off crash, and no busy fork loop for an app that dies at every request.
RESPAWN_BACKOFF_FIRST = 0.1
RESPAWN_BACKOFF_MAX = 5.0
# A serving worker that announced heartbeats is sent one this often (one short line each way,
# so negligible); `worker_timeout` counts from the oldest unanswered one, so a hung loop is seen
# within worker_timeout + this. Only one is outstanding at a time: a master whose own loop was
# busy has sent none meanwhile, so it does not take its own delay for the worker's.
HEARTBEAT_INTERVAL = 1.0
# The template reports a worker's wait status milliseconds after the worker's channel closes;
# a report of the worker's end waits this long for it, then says the status is unknown (its
# template was replaced and left first).
EXIT_STATUS_WAIT = 2.0

# ----- inside a worker --------------------------------------------------------------------------
# Each smoke request of a candidate's validation (GET /health, /openapi.json) answers in
# milliseconds; one that hangs fails the candidate well before reload_timeout would.
CHECK_REQUEST = 10.0
# How long a draining worker keeps an idle connection open for one last request: long enough
# for a client that just sent one on a keep-alive connection, short enough to leave soon.
IDLE_DRAIN_GRACE = 2.0
# How long a worker outlives its master: it finishes what it can in this time, then leaves.
ORPHAN_GRACE = 1.5
# How long a connection refused for its request head (431, 408) may go on sending, its bytes
# discarded, before it is closed: closing at once would reset it before the client read the answer.
LINGER = 1.0
# How long, after a "close", a request whose connection was cut gets to notice and end by itself
# (a streaming response does at once) before it is cancelled (and logged, one line each).
CLOSE_REQUEST_GRACE = 1.0

# ----- control channel --------------------------------------------------------------------------
# How long a caller (the reload endpoint, /status, the test apps) waits for the master's answer.
# The master answers at once unless its loop is blocked; a caller that gave up has told its
# client "not started", and the master drops a reload it reads later (control.py).
CONTROL_ASK = 5.0
# A metrics scrape waits at most this long for the master's status, then answers without the
# gauges it gives (generation, workers by state): a scrape must not hang on a blocked master.
METRICS_STATUS = 2.0
# Time kept between a request's deadline and its caller's timeout, for the answer's way back.
ANSWER_MARGIN = 0.5
# The master's side: a client that connects and sends no request line is dropped after this.
CONTROL_READ = 5.0
# The runtime-directory sweep probes an old master's control socket; a live one accepts at once.
CONTROL_PROBE = 1.0

# ----- self-upgrade (upgrade.py) ------------------------------------------------------------------
# A new master gets reload_timeout for its first generation, like a reload, plus this to start: a
# fresh interpreter importing pypnm and starting its fork template (TEMPLATE_START's cold imports).
UPGRADE_START = 60.0
# Each step of the handover between two live masters (the offer, the confirmation) takes
# milliseconds; a peer silent for this long is hung or gone.
HANDOVER_ANSWER = 10.0
