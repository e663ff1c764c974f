"""The next reload's snapshot directory, linked ahead while the service is quiet (`NextSnapshot`).

Why: most of what a snapshot costs at a reload is hard-linking each unchanged file of the
serving snapshot, and its bytecode, into the new directory: 408 links for the 200-module
benchmark app, 20-25 ms on an idle host and about 55 ms while the workers serve under load,
in the reload's first moments, when the standby's release runs too. None of it depends on
what changed. So `PREPARE_AFTER` seconds after each reload ends (the new workers' first
requests and the old ones' drain go first), a background thread of the master links the
serving snapshot's files into a directory of their own (`snapshot.prepare_next`); the next
reload's snapshot takes that directory over and only stats the tree, replaces the files that
changed and removes the ones that are gone (`take_snapshot(prepared=...)`).

The rules that keep it right:
- The links are made from the serving generation's snapshot, and taken only by a snapshot whose
  previous one is that very snapshot; after a rollback they are made again, from the one that serves then.
- A reload that starts while the links wait for `PREPARE_AFTER` cancels them and links as
  it always did; one that starts while they are being made waits for them (it would make the
  same links itself). A reload that failed before its snapshot leaves them for the next one.
- A refused link (another file system, one without hard links) leaves nothing behind, and the
  snapshot links or copies file by file as before. So does a bytecode cache kept outside the
  tree (`PYTHONPYCACHEPREFIX`): the links would name the directory made ahead, not the snapshot.
- The directory is in the runtime directory: what a stop leaves there goes with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
from dataclasses import dataclass, field
from pathlib import Path

from pypnm.supervisor.snapshot import Prepared, Snapshot, prepare_next

logger = logging.getLogger(__name__)

# Seconds from the end of a reload to linking the next snapshot's files.
PREPARE_AFTER = 0.5
# What a file system that refuses hard links answers (then every time: said once).
REFUSED = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}


@dataclass(eq=False)
class _Preparation:
    """One making of the links: from which snapshot, and whether its thread has started (it then runs to its end)."""

    base: Snapshot
    task: asyncio.Task[Prepared | None] = field(init=False)  # set as it is made (the task is given this object)
    linking: bool = False

    def waiting(self) -> bool:
        return not self.task.done() and not self.linking


class NextSnapshot:
    """The links of the serving snapshot's files, made ahead of the next reload (see the module docstring)."""

    def __init__(self, runtime: Path) -> None:
        self.runtime = runtime
        self._current: _Preparation | None = None
        self._names = itertools.count(1)
        self._refused_before = False

    def prepare(self, base: Snapshot | None) -> None:
        """A reload ended and `base` is the serving generation's snapshot: link its files ahead of the next one.

        Links already made (or being made) from `base` are kept: the reload that ended did not take
        them (it failed before its snapshot).
        """
        if self._current is not None and self._current.base is base:
            return
        self.discard()
        if base is not None:
            current = self._current = _Preparation(base)
            current.task = asyncio.create_task(self._prepare(current, self.runtime / f"next-{next(self._names)}"))

    async def _prepare(self, current: _Preparation, directory: Path) -> Prepared | None:
        await asyncio.sleep(PREPARE_AFTER)
        current.linking = True
        try:
            prepared = await asyncio.to_thread(prepare_next, current.base, directory)
        except OSError as exc:
            # A file system that refuses links refuses them every time: said once, at info.
            refused = exc.errno in REFUSED
            log = logger.debug if refused and self._refused_before else logger.info
            log("the next snapshot's files are not linked ahead: %s", exc.strerror or exc)
            self._refused_before = self._refused_before or refused
            return None
        except Exception:  # never a reason for a reload to fail: it links file by file instead
            logger.warning("the next snapshot's files are not linked ahead", exc_info=True)
            return None
        logger.debug("the next snapshot's files linked ahead in %.0fms (%s)", prepared.took_ms, directory.name)
        return prepared

    def reload_started(self) -> None:
        """A reload starts: links still waiting for PREPARE_AFTER are not made (the reload does not wait for them)."""
        if self._current is not None and self._current.waiting():
            self.discard()

    async def take(self) -> Prepared | None:
        """For the reload's snapshot: the links made ahead, once made (waiting for a thread making them); or None."""
        current, self._current = self._current, None
        if current is None:
            return None
        if current.waiting():
            current.task.cancel()
            return None
        # Shielded: a stop that cancels the reload lets the thread finish; the runtime directory then goes.
        return await asyncio.shield(current.task)

    def discard(self) -> None:
        """Nobody will take what is prepared (a new one is made, or the master stops): cancel it or remove it."""
        current, self._current = self._current, None
        if current is None:
            return
        if current.waiting():
            current.task.cancel()
        else:
            current.task.add_done_callback(_remove_result)


def _remove_result(task: asyncio.Task[Prepared | None]) -> None:
    """Remove a prepared directory that no snapshot took (in a thread: some hundred unlinks)."""
    if task.cancelled() or task.exception() is not None:
        return
    prepared = task.result()
    if prepared is not None:
        with contextlib.suppress(RuntimeError):  # the loop is closing: the runtime directory goes with it
            asyncio.get_running_loop().run_in_executor(None, prepared.remove)
