"""The reload queue and a reload's record (supervisor/reloads.py), in-process: no service is started.

The clock and the sleep are the queue's parameters: a fake clock that a fake sleep moves
forward makes the min-interval visible without waiting for it.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

from pypnm.supervisor.reloads import HISTORY, ReloadDropped, ReloadOutcome, ReloadQueue, ReloadRecord
from pypnm.supervisor.status import reload_state


class FakeTime:
    """A monotonic clock that only `sleep` moves; `during_sleep` runs while a sleep is in progress."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []
        self.during_sleep: Callable[[], object] = lambda: None

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.during_sleep()
        self.now += seconds


def in_loop(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """Run an async test in a fresh event loop (the suite has no asyncio plugin)."""

    @functools.wraps(test)
    def run() -> None:
        asyncio.run(test())

    return run


def make_queue(min_interval: float = 0.0) -> tuple[ReloadQueue, FakeTime]:
    fake = FakeTime()
    return ReloadQueue(lambda: min_interval, clock=fake.clock, sleep=fake.sleep), fake


def test_requests_while_one_is_queued_join_it() -> None:
    queue, _ = make_queue()
    first = queue.request("SIGHUP")
    assert queue.pending is first and first.coalesced == 0
    assert queue.request("http") is first
    assert queue.request("file change: /x.py") is first
    assert first.coalesced == 2 and first.source == "SIGHUP"


@in_loop
async def test_one_runs_and_one_waits() -> None:
    queue, _ = make_queue()
    running = queue.request("start")
    assert await queue.next() is running
    assert queue.current is running and queue.pending is None
    follow_up = queue.request("SIGHUP")  # arrives while `running` runs: a new record, queued
    assert follow_up is not running and queue.pending is follow_up
    assert queue.request("http") is follow_up  # and the storm joins it, not a third
    assert queue.records() == [running]


@in_loop
async def test_the_follow_up_waits_for_min_interval_and_collects_triggers_meanwhile() -> None:
    queue, fake = make_queue(min_interval=5.0)
    first = queue.request("start")
    assert await queue.next() is first
    assert fake.slept == []  # the first reload never waits
    queue.done(first)

    fake.now += 2.0
    follow_up = queue.request("SIGHUP")
    fake.during_sleep = lambda: queue.request("http")  # a trigger during the wait joins the queued reload
    assert await queue.next() is follow_up
    assert fake.slept == [pytest.approx(3.0)]  # 5 s after the previous start, not after the request
    assert follow_up.coalesced == 1

    fake.now += 10.0  # long after: no wait at all
    later = queue.request("SIGHUP")
    assert await queue.next() is later and fake.slept == [pytest.approx(3.0)]


@in_loop
async def test_a_storm_during_a_reload_builds_at_most_two_generations() -> None:
    queue, _ = make_queue()
    started: list[str] = []
    storm_done = asyncio.Event()

    async def reload(record: ReloadRecord) -> None:
        started.append(record.id)
        record.begin(len(started))
        if len(started) == 1:
            for n in range(50):
                queue.request(f"file change: /f{n}.py")
        else:
            storm_done.set()
        record.finish(ReloadOutcome.SUCCEEDED)

    first = queue.request("SIGHUP")
    runner = asyncio.create_task(queue.run(reload))
    await asyncio.wait_for(storm_done.wait(), 5)
    runner.cancel()
    assert len(started) == 2 and started[0] == first.id
    assert queue.history[-1].coalesced == 49 and queue.pending is None


def test_a_request_read_after_its_deadline_is_dropped() -> None:
    queue, fake = make_queue()
    with pytest.raises(ReloadDropped, match="nothing was started"):
        queue.request("http (request r1)", deadline=fake.now - 0.5)
    assert queue.pending is None  # not queued: a retry reloads once
    assert queue.request("http (request r2)", deadline=fake.now + 1).source == "http (request r2)"
    # A request without a deadline (a signal, a file, an older client) never expires.
    assert queue.request("SIGHUP") is queue.pending


def test_an_interrupted_reload_is_recorded_as_failed_and_history_is_bounded() -> None:
    queue, _ = make_queue()
    records = [ReloadRecord(source=f"r{n}") for n in range(HISTORY + 5)]
    for record in records:
        queue.current = record
        queue.done(record)
    assert queue.current is None
    assert queue.history == records[-HISTORY:]
    assert all(r.outcome == "failed" and r.reason == "interrupted: pypnm is stopping" for r in records)


def test_a_record_goes_through_its_phases() -> None:
    record = ReloadRecord(source="SIGHUP")
    assert record.as_dict()["outcome"] is None and record.as_dict()["started_at"] is None
    record.begin(7)
    assert (record.phase, record.generation) == ("validating", 7)
    record.validated()
    assert record.phase == "swapping" and record.validated_ms is not None
    record.finish(ReloadOutcome.SUCCEEDED)
    assert record.phase is None and record.outcome == "succeeded" and record.duration_ms is not None


def test_the_records_view_is_the_documented_one() -> None:
    record = ReloadRecord(source="http")
    record.begin(2)
    record.finish(ReloadOutcome.FAILED, "SyntaxError: invalid syntax (app.py, line 3)")
    shown = record.as_dict()
    assert list(shown) == [
        "source",
        "id",
        "requested_at",
        "coalesced",
        "generation",
        "outcome",
        "reason",
        "warnings",
        "started_at",
        "finished_at",
        "duration_ms",
        "validated_ms",
        "rollback_window",
        "stability",
        "stability_detail",
        "rolled_back_by",
        "replaced_by",
        "rolls_back",
        "import",
    ]
    assert type(shown["outcome"]) is str and shown["outcome"] == "failed"  # a plain string in the JSON


@in_loop
async def test_reload_state_follows_the_running_reload() -> None:
    queue, _ = make_queue()
    assert reload_state(queue, draining=False) == "idle"
    assert reload_state(queue, draining=True) == "draining"
    record = queue.request("SIGHUP")
    assert reload_state(queue, draining=False) == "idle"  # queued is not running
    await queue.next()
    record.begin(1)
    assert reload_state(queue, draining=True) == "validating"  # a running reload outranks a drain
    record.validated()
    assert reload_state(queue, draining=False) == "swapping"
    record.finish(ReloadOutcome.SUCCEEDED)
    queue.done(record)
    assert reload_state(queue, draining=True) == "draining"


@in_loop
async def test_run_tells_each_reload_s_start_when_taken_and_its_end_once_recorded() -> None:
    """on_start/on_finish carry systemd's RELOADING=1 and READY=1: a reload is told as started when
    it is taken from the queue, never when queued (so every trigger that joined it came before),
    and as finished once its outcome is in the history, an interrupted one's too."""
    queue, fake = make_queue(min_interval=5.0)
    told: list[tuple[str, str, int, list[str]]] = []  # (event, reload id, coalesced then, history ids then)
    queued: list[ReloadRecord] = []
    running_ids: list[str | None] = []
    second_runs = asyncio.Event()

    def tell(event: str) -> Callable[[ReloadRecord], None]:
        return lambda record: told.append((event, record.id, record.coalesced, [r.id for r in queue.history]))

    async def reload(record: ReloadRecord) -> None:
        running_ids.append(queue.current_id())
        record.begin(len(running_ids))
        if len(running_ids) == 1:
            queued.append(queue.request("SIGHUP"))  # arrives while the first runs: queued, not started
            assert [event for event, *_ in told] == ["start"]
            record.finish(ReloadOutcome.SUCCEEDED)
            return
        second_runs.set()
        await asyncio.Event().wait()  # runs until the master stops (cancelled)

    first = queue.request("start")
    fake.during_sleep = lambda: queue.request("http")  # joins the follow-up while min_interval passes
    runner = asyncio.create_task(queue.run(reload, on_start=[tell("start")], on_finish=[tell("finish")]))
    await asyncio.wait_for(second_runs.wait(), 5)
    [second] = queued
    assert running_ids == [first.id, second.id] and queue.current_id() == second.id
    runner.cancel()
    with pytest.raises(asyncio.CancelledError):
        await runner

    assert queue.current_id() is None
    assert told == [
        ("start", first.id, 0, []),
        ("finish", first.id, 0, [first.id]),
        ("start", second.id, 1, [first.id]),  # after the wait: the "http" trigger had joined it
        ("finish", second.id, 1, [first.id, second.id]),
    ]
    assert first.outcome == "succeeded" and fake.slept == [pytest.approx(5.0)]
    assert second.outcome == "failed" and second.reason == "interrupted: pypnm is stopping"
