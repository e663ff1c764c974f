"""The reload queue: one reload runs, at most one waits, and each one's record from request to outcome.

Requests that arrive while one is queued join it (coalesce) and share its record, so a storm
of triggers builds at most two generations: the one running and one follow-up. The queued
one starts no sooner than `reload_min_interval` after the previous one started. An automatic
rollback (rollback.py) is a reload too, queued in a slot of its own: it never joins an ordinary
reload (that one builds from what is on disk, which may be the code that crashed), and it runs
before one that is queued. While a self-upgrade runs the queue is held (`hold`): a reload asked
for waits, and is handed to the new master when it takes over (`forward`), or run here when the
upgrade fails (`release`), so that the two masters do not number two generations alike (a
rollback, which is not held, may). A request
carrying a deadline (from the control channel) that is read after it is dropped: its
caller has already answered "not started", and a retry must not reload twice.

Pure: no processes and no sockets; the clock and the sleep are parameters, so the
coalescing can be tested in-process (tests/test_reload_queue.py). A record's phase and
outcome are written by the record's own methods alone.

The queue logs under the master's logger name: operators grep "pypnm.supervisor.master"
for everything about reloads.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from pypnm.identity import utc_now
from pypnm.supervisor import control

logger = logging.getLogger("pypnm.supervisor.master")

HISTORY = 20  # reloads kept for /status: enough to see a storm's pattern, small enough for one answer


# Where a running reload is: "validating" (snapshot, candidate brought up and validated), then
# "swapping" (the candidate accepts, the serving generation stops). /status shows it as reload_state.
ReloadPhase = Literal["validating", "swapping"]


class ReloadOutcome(StrEnum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"  # a rollback's own record: the previous generation's snapshot serves again


# What became of a succeeded reload's generation during its `rollback_window` (rollback.py):
# "watching" while the window runs; then "stable" (the window passed), "rolled_back" (its
# workers crashed `rollback_crashes` times and the previous snapshot serves again), "unstable"
# (they did, but there was nothing to roll back to or the rollback failed), or "replaced" (another
# reload swapped it out first). None: no window (rollback_window = 0, or a failed reload).
Stability = Literal["watching", "stable", "rolled_back", "unstable", "replaced"]


class ReloadDropped(Exception):
    """A request read after its caller's deadline: nothing was started; the message says so."""


@dataclass
class ReloadRecord:
    """One reload, from request to outcome; what `/status` and `pypnm reload --wait` read."""

    source: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    requested_at: str = field(default_factory=utc_now)
    coalesced: int = 0
    generation: int | None = None
    outcome: ReloadOutcome | None = None
    reason: str | None = None
    warnings: list[str] = field(default_factory=list)
    started_at: str | None = None
    finished_at: str | None = None
    duration_ms: float | None = None
    validated_ms: float | None = None  # start -> candidate validated; the rest of duration_ms is the swap
    rollback_window: float | None = None  # seconds its generation is watched after the swap (None: not watched)
    stability: Stability | None = None
    stability_detail: str | None = None  # the crashes, when rolled_back or unstable; who replaced it
    rolled_back_by: str | None = None  # the id of the rollback that undid it
    replaced_by: str | None = None  # the id of the reload that replaced its generation within its window
    rolls_back: str | None = None  # on a rollback's record: the id of the reload it undoes
    # How the candidate's code was imported: {"mode": "incremental", "reimported": N} or
    # {"mode": "clean"} (with "reason" when incremental was asked for); shown as "import".
    import_: dict[str, Any] | None = None
    _phase: ReloadPhase | None = field(default=None, repr=False)
    _requested_monotonic: float = field(default_factory=time.monotonic, repr=False)  # for the metrics' durations
    _t0: float = field(default=0.0, repr=False)
    _finished: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def phase(self) -> ReloadPhase | None:
        """None before it starts and once it has finished."""
        return self._phase

    def since_requested(self) -> float:
        """Seconds since it was first requested (the reload duration metric: trigger to serving)."""
        return time.monotonic() - self._requested_monotonic

    def begin(self, generation: int) -> None:
        self.generation = generation
        self.started_at = utc_now()
        self._phase = "validating"
        self._t0 = time.perf_counter()

    def validated(self) -> None:
        self.validated_ms = round((time.perf_counter() - self._t0) * 1000, 1)
        self._phase = "swapping"

    def finish(self, outcome: ReloadOutcome, reason: str | None = None) -> None:
        self.outcome = outcome
        self.reason = reason
        self.finished_at = utc_now()
        self.duration_ms = round((time.perf_counter() - self._t0) * 1000, 1)
        self._phase = None
        self._finished.set()

    async def wait(self) -> None:
        await self._finished.wait()

    def watch(self, window: float) -> None:
        self.rollback_window = window
        self.stability = "watching"

    def settle(self, stability: Stability, detail: str | None = None, by: str | None = None) -> None:
        """The end of its watch (rollback.py): see `Stability`; `by` is the rollback that undid it, or the reload
        that replaced it."""
        self.stability = stability
        self.stability_detail = detail
        if stability == "replaced":
            self.replaced_by = by
        else:
            self.rolled_back_by = by

    def as_dict(self) -> dict[str, Any]:
        shown = {k.rstrip("_"): v for k, v in self.__dict__.items() if not k.startswith("_")}
        if self.outcome is not None:
            shown["outcome"] = self.outcome.value
        return shown


class ReloadQueue:
    """One reload running (`current`), at most one waiting (`pending`), the last HISTORY finished."""

    def __init__(
        self,
        min_interval: Callable[[], float],
        *,
        clock: Callable[[], float] = control.clock,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self._min_interval = min_interval  # a callable: the setting may change with every reload
        self._clock = clock  # CLOCK_MONOTONIC, the clock of the control channel's deadlines
        self._sleep = sleep
        self.pending: ReloadRecord | None = None
        self.rollback: ReloadRecord | None = None  # a queued rollback: it runs before `pending`
        self.current: ReloadRecord | None = None
        self.history: list[ReloadRecord] = []
        self.held = False  # a self-upgrade runs: `pending` waits (a rollback does not)
        self._last_started = -1e9
        self._wanted = asyncio.Event()

    def request(self, source: str, deadline: float | None = None) -> ReloadRecord:
        """Queue a reload, or join the one already queued; the record that will carry the outcome.

        Raises ReloadDropped when `deadline` (CLOCK_MONOTONIC) has passed: see the module docstring.
        """
        late = control.expired_by(deadline, self._clock())
        if late is not None:
            logger.warning(
                "reload requested by %s dropped: its caller gave up (read %.1fs after its "
                "deadline; the master was not answering); nothing was started",
                source,
                late,
            )
            raise ReloadDropped("the request expired before the supervisor read it; nothing was started")
        if self.pending is not None:
            self.pending.coalesced += 1
            logger.info("reload requested by %s: coalesced into queued reload %s", source, self.pending.id)
            return self.pending
        self.pending = ReloadRecord(source=source)
        logger.info("reload requested by %s: reload %s queued", source, self.pending.id)
        self._wanted.set()
        return self.pending

    def request_rollback(self, rolls_back: str) -> ReloadRecord:
        """Queue the rollback of reload `rolls_back` (rollback.py asks once per watched generation)."""
        self.rollback = ReloadRecord(source="rollback", rolls_back=rolls_back)
        logger.info("reload %s queued: rollback of reload %s", self.rollback.id, rolls_back)
        self._wanted.set()
        return self.rollback

    def hold(self) -> None:
        """A self-upgrade began: a reload asked for from now on waits for its end (a running one runs on)."""
        self.held = True

    def release(self) -> None:
        """The upgrade failed: the reload that waited runs here."""
        self.held = False
        self._wanted.set()

    def forward(self) -> ReloadRecord | None:
        """The upgrade succeeded: the reload that waited, taken out of this queue for the new master to run."""
        record, self.pending = self.pending, None
        return record

    def give_up(self, record: ReloadRecord, reason: str) -> None:
        """A reload taken out (`forward`) that no master will run: recorded as failed, for a waiting client."""
        record.finish(ReloadOutcome.FAILED, reason)
        self._remember(record)
        logger.error("reload %s failed: %s", record.id, reason)

    def adopt(self, reload_id: str, source: str, requested_at: str, coalesced: int) -> ReloadRecord:
        """Queue a reload that the old master was asked for during the upgrade that started this one, by its id.

        Under its id, so that `pypnm reload --wait`, which asked the old master, finds its outcome
        here. One queued here already takes it in (coalesced), as it would any trigger.
        """
        if self.pending is not None:
            self.pending.coalesced += 1 + coalesced
            logger.info("reload %s of the old master: coalesced into queued reload %s", reload_id, self.pending.id)
            return self.pending
        self.pending = ReloadRecord(source=source, id=reload_id, requested_at=requested_at, coalesced=coalesced)
        logger.info("reload requested by %s of the old master during the upgrade: reload %s queued", source, reload_id)
        self._wanted.set()
        return self.pending

    def withdraw_rollback(self) -> ReloadRecord | None:
        """Take back a queued rollback that is not needed any more (never started: nothing to record)."""
        record, self.rollback = self.rollback, None
        return record

    async def next(self) -> ReloadRecord:
        """Wait for a queued reload and for `min_interval` since the previous start; it is `current` then.

        A queued rollback goes first, and without waiting out `min_interval`: it undoes a generation
        whose workers keep crashing, and the interval may be that generation's own setting. One that
        comes while a reload waits out the interval ends that wait. One withdrawn during the wait
        leaves nothing to take: wait again.
        """
        while True:
            while self.rollback is None and (self.pending is None or self.held):
                self._wanted.clear()
                await self._wanted.wait()
            if self.rollback is not None:
                record, self.rollback = self.rollback, None
                break
            delay = self._last_started + self._min_interval() - self._clock()
            if delay <= 0 and self.pending is not None and not self.held:
                record, self.pending = self.pending, None
                break
            await self._sleep_unless_rollback(delay)  # triggers arriving now join self.pending
        self._last_started = self._clock()
        self.current = record
        return record

    async def _sleep_unless_rollback(self, delay: float) -> None:
        """Sleep `delay` seconds, or less if a rollback is queued meanwhile (`request_rollback` wakes it)."""
        self._wanted.clear()
        sleeping = asyncio.ensure_future(self._sleep(delay))
        woken = asyncio.ensure_future(self._wanted.wait())
        try:
            await asyncio.wait({sleeping, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeping.cancel()
            woken.cancel()

    async def run(
        self,
        reload: Callable[[ReloadRecord], Awaitable[None]],
        *,
        on_start: Sequence[Callable[[ReloadRecord], object]] = (),
        on_finish: Sequence[Callable[[ReloadRecord], object]] = (),
    ) -> None:
        """Run the queued reloads one at a time with `reload`, for ever (until cancelled).

        Each of `on_start` is called when a record is taken from the queue, never when it is queued
        (systemd's RELOADING=1 must postdate every SIGHUP that joined it); each of `on_finish` once
        it is recorded, interrupted ones included (systemd's READY=1, the reload metrics).
        """
        while True:
            record = await self.next()
            for told in on_start:
                told(record)
            try:
                await reload(record)
            finally:
                self.done(record)
                for told in on_finish:
                    told(record)

    def done(self, record: ReloadRecord) -> None:
        """The current reload is over (or was interrupted: it is recorded as failed)."""
        if record.outcome is None:
            record.finish(ReloadOutcome.FAILED, "interrupted: pypnm is stopping")
        self.current = None
        self._remember(record)

    def _remember(self, record: ReloadRecord) -> None:
        """A finished reload joins the history, which keeps the last HISTORY."""
        self.history = [*self.history, record][-HISTORY:]

    def current_id(self) -> str | None:
        """The running reload's id (stamped on the master's JSON log lines as `reload_id`)."""
        return self.current.id if self.current else None

    def records(self) -> list[ReloadRecord]:
        """The finished reloads, oldest first, and the running one last."""
        return [*self.history, *([self.current] if self.current else [])]
