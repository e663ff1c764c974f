"""Who is serving: the process facts that `/status` reports and the master compares.

`code_version` hashes the source files of a package as they are on disk at the
moment it is called; the app calls it once when it is built, so a running process
keeps reporting the code it loaded even after the files change under it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

SUPERVISOR_ENV = "PYPNM_SUPERVISOR"  # the master's control socket, set for supervised workers
# Key of the dict a supervised worker puts into the ASGI lifespan state, which every request's
# scope["state"] copies: {"generation": int, "stopping": bool}. A plain dict, because the worker
# (supervisor code, fixed at start) and the app (reloaded code) may be different versions.
WORKER_STATE_KEY = "pypnm_worker"


def code_version(package_dir: Path) -> str:
    """A short hash over every `.py` file below `package_dir` (names and contents)."""
    return code_version_of(
        (path.relative_to(package_dir).as_posix(), hashlib.sha256(path.read_bytes()).digest())
        for path in package_dir.rglob("*.py")
        if "__pycache__" not in path.parts
    )


def code_version_of(files: Iterable[tuple[str, bytes]]) -> str:
    """`code_version` from each `.py` file's path relative to the package (posix) and the sha256 of its content.

    The master's snapshot has both in its manifest already (snapshot.py), so it need not read
    the files again; a worker of pypnm's own app reads them (`code_version`): the two agree.
    """
    digest = hashlib.sha256()
    for relative, content in sorted(files, key=lambda file: file[0].split("/")):
        digest.update(relative.encode())
        digest.update(b"\0")
        digest.update(content)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# When this process started: reset in a forked child, because under pypnm the app is built (and
# this module imported) once per generation by its zygote, and each worker is a fork of it.
_started_at = utc_now()


def _forked() -> None:
    global _started_at
    _started_at = utc_now()


os.register_at_fork(after_in_child=_forked)


@dataclass(frozen=True)
class ProcessIdentity:
    """The app's build (set when the app is built) and the process serving it (read when asked)."""

    version: str
    code_version: str

    @property
    def pid(self) -> int:
        return os.getpid()

    @property
    def started_at(self) -> str:
        return _started_at

    @property
    def mode(self) -> str:
        return "supervised" if os.environ.get(SUPERVISOR_ENV) else "unsupervised"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pid": self.pid, "started_at": self.started_at, "mode": self.mode}
