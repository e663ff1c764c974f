"""Per-generation zygotes: a generation's code is imported once, its workers are forked after the import.

The app here writes a line (its pid) to a file each time its main module is imported, so the
tests count imports; it reports the nice value and scheduling policy it was imported at, the
ones its lifespan startup ran at, and the ones it serves at.
"""

from __future__ import annotations

import contextlib
import os
import re
import resource
import signal
import subprocess
import sys
import time
import types
import weakref
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from conftest import (
    STATUS_ROUTES,
    Service,
    StartService,
    base_env,
    hold_next_import,
    pid_alive,
    process_stat,
    pypnm_command,
    reload_by_sighup,
    reload_finished,
    rewrite,
    serve_held_import,
    supervisor_status,
    wait_until,
    write_app_package,
)
from pypnm.supervisor import priority, reimport

APP = "zyg.main:app"

MAIN = (
    '''"""A test app that counts its imports."""

import os

from fastapi import FastAPI
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from zyg import leaf, registry
from zyg.names import NAME
import zyg.plugin

MAIN = "main1"
IMPORT_NICE = os.getpriority(os.PRIO_PROCESS, 0)
IMPORT_POLICY = os.sched_getscheduler(0)
with open(os.environ["ZYG_IMPORTS"], "a") as log:
    log.write(f"{os.getpid()}\\n")

app = FastAPI()
startup_nice: list[int] = []
startup_policy: list[int] = []


class Counted(Route):
    """Writes the pid of each process that matches a request against it."""

    def matches(self, scope):
        with open(os.environ["ZYG_MATCHES"], "a") as log:
            log.write(f"{os.getpid()}\\n")
        return super().matches(scope)


app.router.routes.append(Counted("/counted", lambda request: PlainTextResponse("counted")))


@app.on_event("startup")
async def startup() -> None:
    startup_nice.append(os.getpriority(os.PRIO_PROCESS, 0))
    startup_policy.append(os.sched_getscheduler(0))
    getattr(leaf, "startup", lambda: None)()  # a leaf module may start something in each worker


@app.get("/values")
async def values() -> dict[str, object]:
    return {
        "leaf": zyg.leaf.VALUE,  # through the package: a kept submodule of a package imported again is on it
        "name": NAME,
        "main": MAIN,
        "registry": registry.ITEMS,
        "pid": os.getpid(),
        "nice": {"import": IMPORT_NICE, "startup": startup_nice[0], "serving": os.getpriority(os.PRIO_PROCESS, 0)},
        "policy": {"import": IMPORT_POLICY, "startup": startup_policy[0], "serving": os.sched_getscheduler(0)},
    }
'''
    + STATUS_ROUTES
)


# Adds itself to a registry (an unchanged module) as it is imported: what an incremental import keeps stale.
PLUGIN = """from zyg import registry

if "strict" in registry.ITEMS:
    raise RuntimeError("registered twice")
registry.ITEMS.append("NAME")
"""


def write_app(root: Path) -> Path:
    package = root / "zyg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "leaf.py").write_text('VALUE = "leaf1"\n')
    (package / "names.py").write_text('NAME = "name1"\n')
    (package / "registry.py").write_text("ITEMS: list[str] = []\n")
    (package / "plugin.py").write_text(PLUGIN.replace("NAME", "plugin1"))
    (package / "main.py").write_text(MAIN)
    return package


def serve_app(start_service: StartService, root: Path, workers: int, *flags: str, **env: str) -> Any:
    write_app(root)
    env = base_env(
        ZYG_IMPORTS=str(root / "imports.log"),
        ZYG_MATCHES=str(root / "matches.log"),
        PYPNM_RELOAD_MIN_INTERVAL="0",
        **env,
    )
    return start_service(
        pypnm_command("--app", APP, "--port", "{port}", "--workers", str(workers), *flags), cwd=root, env=env
    )


def serve_watching(start_service: StartService, root: Path) -> Any:
    """`pypnm --reload` (one worker): the test app, once its first generation serves and its files are watched."""
    service = serve_app(start_service, root, 1, "--reload")
    serving_workers(service, 1, 1)
    wait_until(lambda: "watching" in service.output(), timeout=10)
    return service


def imports(root: Path) -> list[int]:
    return [int(line) for line in (root / "imports.log").read_text().split()]


def serving_workers(service: Any, generation: int, count: int) -> dict[str, Any]:
    def alone() -> dict[str, Any] | None:
        status = supervisor_status(service)
        workers = status["workers"]
        ok = (
            status["generation"] == generation
            and status["reload_state"] == "idle"
            and len(workers) == count
            and all(w["generation"] == generation and w["state"] == "serving" for w in workers)
        )
        return status if ok else None

    result: dict[str, Any] = wait_until(alone, timeout=30)
    return result


def test_a_generation_imports_once_whatever_its_worker_count(start_service: StartService, tmp_path: Path) -> None:
    service = serve_app(start_service, tmp_path, 3)
    status = serving_workers(service, 1, 3)
    [zygote] = status["master"]["zygote_pids"]
    assert imports(tmp_path) == [zygote]  # imported once, by the zygote; the 3 workers are its forks
    assert all(pid_alive(w["pid"]) and w["pid"] != zygote for w in status["workers"])
    # The zygote matched a request against the routes before forking (worker.build_routes), so that
    # routing state a framework builds at the first request is built once, not in each worker;
    # the workers match only the requests they are sent.
    matched = [int(pid) for pid in (tmp_path / "matches.log").read_text().split()]
    assert matched[0] == zygote and matched.count(zygote) == 1

    status = reload_by_sighup(service, 1)
    assert status["last_reload"]["outcome"] == "succeeded", status["last_reload"]
    status = serving_workers(service, 2, 3)
    [new_zygote] = status["master"]["zygote_pids"]
    assert imports(tmp_path) == [zygote, new_zygote]
    wait_until(lambda: not pid_alive(zygote), timeout=20)  # the drained generation's zygote left with it


def test_respawns_fork_from_the_generations_zygote_or_a_new_one(start_service: StartService, tmp_path: Path) -> None:
    service = serve_app(start_service, tmp_path, 2)
    status = serving_workers(service, 1, 2)
    [zygote] = status["master"]["zygote_pids"]
    victim = status["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)

    status = replaced(service, victim)
    assert imports(tmp_path) == [zygote]  # the replacement was forked from the zygote: no import
    assert status["worker_exits"][0]["ended"] == "killed by SIGKILL (killed, out of memory?)"

    # Without its zygote, a generation's replacement is forked from a new one, importing the same snapshot.
    os.kill(zygote, signal.SIGKILL)
    victim = status["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    status = replaced(service, victim)
    [new_zygote] = status["master"]["zygote_pids"]
    assert new_zygote != zygote and imports(tmp_path) == [zygote, new_zygote]
    assert service.get("/values").json()["main"] == "main1"


def test_a_drained_generations_workers_do_not_leave_at_one_moment(start_service: StartService, tmp_path: Path) -> None:
    """Workers started together tick at random phases, so a drained generation's exits are spread (worker.main_loop).

    Each worker notices that it is to leave at its next 0.1 s tick. In step, 8 idle workers told at
    once say `Shutting down` within 4-21 ms of each other here (the spread is the 2 cores' turns);
    at random phases, within 74-87 ms. Two drains, the wider over 40 ms: by chance both 8 random
    phases fall within 40 ms about once in 14,000 runs.
    """
    service = serve_app(start_service, tmp_path, 8)
    serving_workers(service, 1, 8)
    spreads = []
    for drained in (1, 2):
        reload_by_sighup(service, drained)
        leaving = shutting_down(service, drained)
        assert len(leaving) == 8, leaving
        spreads.append((max(leaving) - min(leaving)).total_seconds())
    assert max(spreads) > 0.04, spreads


def shutting_down(service: Service, generation: int) -> list[datetime]:
    """When each worker of `generation` said `Shutting down`, once the generation has drained."""
    wait_until(lambda: f"generation {generation} drained" in service.output(), timeout=30)
    return [
        datetime.fromisoformat(line.split()[0].rstrip("Z"))
        for line in service.output().splitlines()
        if f"gen={generation}] uvicorn.error: Shutting down" in line
    ]


def replaced(service: Any, victim: int) -> dict[str, Any]:
    """The status once generation 1's two workers serve again, `victim` not among them."""

    def done() -> dict[str, Any] | None:
        status = serving_workers(service, 1, 2)
        return status if victim not in {w["pid"] for w in status["workers"]} else None

    result: dict[str, Any] = wait_until(done, timeout=30)
    return result


def test_candidates_run_at_the_lowest_priority_until_they_serve(start_service: StartService, tmp_path: Path) -> None:
    # The tests run as root (CAP_SYS_NICE): the priority can be given back, so candidates run SCHED_IDLE and niced.
    service = serve_app(start_service, tmp_path, 2)
    serving_workers(service, 1, 2)
    base = os.getpriority(os.PRIO_PROCESS, 0)
    for _ in range(4):  # both workers, most likely
        values = service.get("/values").json()
        assert values["nice"] == {"import": base + 10, "startup": base + 10, "serving": base}
        idle, normal = os.SCHED_IDLE, os.SCHED_OTHER
        assert values["policy"] == {"import": idle, "startup": idle, "serving": normal}


def test_a_candidate_not_ready_in_time_is_promoted_and_stays_niced(start_service: StartService, tmp_path: Path) -> None:
    """SCHED_IDLE gets no CPU on cores that never go idle: a candidate not ready IDLE_LIMIT seconds after its
    fork (here a zygote held in the app's import) runs at the normal policy from then on, still niced."""
    service = serve_held_import(start_service, tmp_path)
    base = os.getpriority(os.PRIO_PROCESS, 0)
    zygote = hold_next_import(service, tmp_path)
    assert (tmp_path / "policy").read_text().split() == [str(os.SCHED_IDLE), str(base + 10)]  # as its import began

    wait_until(lambda: os.sched_getscheduler(zygote) == os.SCHED_OTHER, timeout=10)
    assert os.getpriority(os.PRIO_PROCESS, zygote) == base + 10
    promoted = f"zygote pid={zygote} of generation 2 not ready 1s after its fork with idle CPU time only"
    wait_until(lambda: promoted in service.output(), timeout=10)

    (tmp_path / "go").touch()
    status = reload_finished(service, 1)
    assert status["last_reload"]["outcome"] == "succeeded", status["last_reload"]
    (worker,) = (w["pid"] for w in status["workers"] if w["generation"] == 2)
    assert (os.sched_getscheduler(worker), os.getpriority(os.PRIO_PROCESS, worker)) == (os.SCHED_OTHER, base)


def test_the_zygote_line_says_how_much_of_its_steps_it_ran_on_the_cpu(
    start_service: StartService, tmp_path: Path
) -> None:
    """A zygote that waited in its import ran a small share of its steps' time; one that computed, at least its CPU.

    What an operator reads a slow reload's cause from: a candidate waiting for the CPU the serving
    workers use (priority.py) shows a low share, an app heavy to import a high one.
    """
    service = serve_held_import(start_service, tmp_path)
    hold_next_import(service, tmp_path)
    time.sleep(1.0)  # the zygote sleeps in its import meanwhile
    (tmp_path / "go").touch()
    assert reload_finished(service, 1)["last_reload"]["outcome"] == "succeeded"
    import_ms, cpu_ms, took_ms = cpu_share(zygote_line(service, 2))
    assert took_ms >= import_ms >= 1000 and cpu_ms < took_ms // 2, (cpu_ms, took_ms)

    (tmp_path / "slow").unlink()
    (tmp_path / "spin").write_text("0.4")
    assert reload_by_sighup(service, 2)["last_reload"]["outcome"] == "succeeded"
    import_ms, cpu_ms, took_ms = cpu_share(zygote_line(service, 3))
    assert 400 <= cpu_ms <= took_ms + 10, (cpu_ms, took_ms)  # its steps' time rounded lap by lap


def cpu_share(line: str) -> tuple[int, int, int]:
    """A clean zygote line's import time, CPU time and the sum of its steps, which the line says its share is of."""
    adapters = r"(?:; field adapters: \d+ reused, \d+ built)?(?:; route contexts: \d+ reused, \d+ built)?"
    found = re.search(rf": import (\d+)ms, routes (\d+)ms{adapters}; CPU (\d+)ms of (\d+)ms \((\d+) %\)$", line)
    assert found, line
    import_ms, routes_ms, cpu_ms, took_ms, percent = (int(group) for group in found.groups())
    assert took_ms == import_ms + routes_ms and percent == cpu_ms * 100 // took_ms, line
    return import_ms, cpu_ms, took_ms


@pytest.mark.skipif(os.geteuid() != 0, reason="switches to an unprivileged user, which only root can do")
@pytest.mark.parametrize("rlimit_nice", [0, 20])
def test_an_unprivileged_process_nices_candidates_only_if_it_can_give_it_back(rlimit_nice: int) -> None:
    """Without CAP_SYS_NICE a nice value goes back down only as far as RLIMIT_NICE allows (20: to 0).

    A forked child (the test's interpreter may not be readable by an unprivileged user)
    becomes `nobody` and runs what the template and a worker run: start, lower, restore.
    """
    if resource.getrlimit(resource.RLIMIT_NICE)[1] < rlimit_nice:
        pytest.skip(f"RLIMIT_NICE's hard limit is below {rlimit_nice} and cannot be raised here (no CAP_SYS_RESOURCE)")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only system calls, then _exit
        code = 1
        try:
            os.close(read)
            resource.setrlimit(resource.RLIMIT_NICE, (rlimit_nice, rlimit_nice))
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            renice = priority.start()
            lowered = priority.lower(priority.CANDIDATE_NICE)
            lowered_policy = os.sched_getscheduler(0)
            priority.restore()
            restored = f"{os.getpriority(os.PRIO_PROCESS, 0)} {os.sched_getscheduler(0)}"
            os.write(write, f"{renice} {lowered} {lowered_policy} {restored}".encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as answer:
        seen = answer.read().split()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    base = os.getpriority(os.PRIO_PROCESS, 0)
    idle, normal = str(os.SCHED_IDLE), str(os.SCHED_OTHER)
    if rlimit_nice == 0:  # the default: candidates run at the serving priority, never stuck niced
        assert seen == ["False", str(base), normal, str(base), normal]
    else:
        assert seen == ["True", str(base + 10), idle, str(base), normal]


def test_the_masters_file_work_runs_on_niced_threads(start_service: StartService, tmp_path: Path) -> None:
    """A reload's snapshot runs on the master's background threads, niced for good; its loop keeps its priority."""
    service = serve_app(start_service, tmp_path, 2)
    status = reload_by_sighup(service, 1)  # the reload's snapshot ran on the master's background threads
    assert status["last_reload"]["outcome"] == "succeeded", status["last_reload"]
    master, base = service.proc.pid, os.getpriority(os.PRIO_PROCESS, 0)
    nice = {int(tid): os.getpriority(os.PRIO_PROCESS, int(tid)) for tid in os.listdir(f"/proc/{master}/task")}
    assert nice.pop(master) == base  # its loop: signals, the control channel, the swap
    assert base + priority.CANDIDATE_NICE in nice.values(), nice


def test_a_process_done_serving_ends_at_the_lowest_priority() -> None:
    """`priority.leave` (what a worker or zygote runs just before it exits) lowers every one of its threads."""
    script = (
        "import os, threading\n"
        "from pypnm.supervisor import priority\n"
        "started, done = threading.Event(), threading.Event()\n"
        "seen = []\n"
        "def other():\n"
        "    started.set(); done.wait(5); seen.append(os.getpriority(os.PRIO_PROCESS, 0))\n"
        "thread = threading.Thread(target=other); thread.start(); started.wait(5)\n"
        "priority.leave()\n"
        "done.set(); thread.join(5)\n"
        "print(os.getpriority(os.PRIO_PROCESS, 0), *seen)\n"
    )
    answer = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True)
    assert answer.stdout.split() == [str(priority.MAX_NICE)] * 2  # the calling thread and the other one


# ----- incremental imports (reload_import = incremental) -----------------------------------------


def reload_ok(service: Any, generation: int) -> dict[str, Any]:
    """SIGHUP; the reload record of `generation` (which must have succeeded), once it alone serves."""
    status = reload_by_sighup(service, generation - 1)
    record: dict[str, Any] = status["last_reload"]
    assert record["generation"] == generation and record["outcome"] == "succeeded", record
    serving_workers(service, generation, 2)
    return record


def reloaded_by_main(service: Any, generation: int) -> dict[str, Any]:
    """The record of reload `generation`, triggered by the change of main.py (the master watches the route module)."""

    def finished() -> dict[str, Any] | None:
        last = supervisor_status(service)["last_reload"]
        return last if last and last["generation"] == generation and last["outcome"] else None

    record: dict[str, Any] = wait_until(finished, timeout=30)
    assert record["outcome"] == "succeeded", record
    serving_workers(service, generation, 2)
    return record


def values(service: Any) -> dict[str, Any]:
    answer: dict[str, Any] = service.get("/values").json()
    return answer


def test_incremental_reimports_what_changed_and_its_importers(start_service: StartService, tmp_path: Path) -> None:
    service = serve_app(start_service, tmp_path, 2, PYPNM_RELOAD_IMPORT="incremental")
    package = tmp_path / "zyg"
    serving_workers(service, 1, 2)

    (package / "leaf.py").write_text('VALUE = "leaf2"\n')  # `from zyg import leaf` in main
    record = reload_ok(service, 2)
    assert record["import"] == {"mode": "incremental", "reimported": 2}  # zyg.leaf and zyg.main
    assert values(service)["leaf"] == "leaf2"

    (package / "names.py").write_text('NAME = "name2"\n')  # `from zyg.names import NAME` in main
    record = reload_ok(service, 3)
    assert record["import"] == {"mode": "incremental", "reimported": 2}
    assert values(service)["name"] == "name2"

    rewrite(package / "main.py", 'MAIN = "main1"', 'MAIN = "main2"')
    record = reloaded_by_main(service, 4)
    assert record["import"] == {"mode": "incremental", "reimported": 1}
    assert values(service) | {"pid": 0, "nice": None, "policy": None} == {
        "leaf": "leaf2",
        "name": "name2",
        "main": "main2",
        "registry": ["plugin1"],  # zyg.plugin was not imported again: unchanged, it imports nothing that changed
        "pid": 0,
        "nice": None,
        "policy": None,
    }
    # One import of the main module per generation, each by that generation's zygote.
    assert len(imports(tmp_path)) == 4 and len(set(imports(tmp_path))) == 4

    # Nothing changed: nothing to import again; the zygote forks workers of the app it was given.
    record = reload_ok(service, 5)
    assert record["import"] == {"mode": "incremental", "reimported": 0}
    assert values(service)["main"] == "main2" and len(imports(tmp_path)) == 4

    # The package itself: it and what imports it (main, and plugin: `from zyg import registry`) are imported
    # again; its unchanged submodules that do not import from it (leaf, names, registry) are kept, and set on it.
    (package / "__init__.py").write_text('"""The package, changed."""\n')
    record = reload_ok(service, 6)
    assert record["import"] == {"mode": "incremental", "reimported": 3}
    answer = values(service)
    assert (answer["leaf"], answer["name"], answer["main"]) == ("leaf2", "name2", "main2")
    assert answer["registry"] == ["plugin1", "plugin1"]  # the kept registry, and plugin's import again


def test_incremental_keeps_what_changed_code_wrote_into_unchanged_modules(
    start_service: StartService, tmp_path: Path
) -> None:
    """The documented limit: a registry (unchanged) keeps the entry the old plugin code added to it."""
    service = serve_app(start_service, tmp_path, 2, PYPNM_RELOAD_IMPORT="incremental")
    package = tmp_path / "zyg"
    serving_workers(service, 1, 2)

    (package / "plugin.py").write_text(PLUGIN.replace("NAME", "plugin2"))
    record = reload_ok(service, 2)
    assert record["import"] == {"mode": "incremental", "reimported": 2}  # zyg.plugin and zyg.main
    assert values(service)["registry"] == ["plugin1", "plugin2"]  # stale: plugin1 is no longer in the code

    # A clean import (here: because a file that is not a module changed) starts from an empty registry.
    (package / "fast.so").write_bytes(b"\x7fELF not really")
    record = reload_ok(service, 3)
    assert record["import"] == {"mode": "clean", "reason": "zyg/fast.so changed, which is not a Python module"}
    assert values(service)["registry"] == ["plugin2"]


def test_incremental_falls_back_to_clean_when_it_cannot_vouch_or_fails(
    start_service: StartService, tmp_path: Path
) -> None:
    service = serve_app(start_service, tmp_path, 2, PYPNM_RELOAD_IMPORT="incremental")
    package = tmp_path / "zyg"
    serving_workers(service, 1, 2)

    # A C extension (any file that is not a .py module) changed.
    (package / "fast.so").write_bytes(b"\x7fELF v1")
    record = reload_ok(service, 2)
    assert record["import"] == {"mode": "clean", "reason": "zyg/fast.so changed, which is not a Python module"}

    # A module the app imports, and an incremental import would keep, imports dynamically.
    (package / "dyn.py").write_text('import importlib\n\nLEAF = importlib.import_module("zyg." + "leaf")\n')
    rewrite(package / "main.py", "import zyg.plugin\n", "import zyg.plugin\nimport zyg.dyn\n")
    reloaded_by_main(service, 3)
    (package / "leaf.py").write_text('VALUE = "leaf2"\n')
    record = reload_ok(service, 4)
    assert record["import"] == {
        "mode": "clean",
        "reason": "a dynamic import in zyg/dyn.py, line 3, which the import graph cannot follow",
    }
    assert values(service)["leaf"] == "leaf2"

    # The incremental candidate fails (a module refuses to register twice in the kept registry); the clean one works.
    strict = 'from zyg import registry\n\nif "strict" in registry.ITEMS:\n    raise RuntimeError("registered twice")\n'
    (package / "strict.py").write_text(strict + 'registry.ITEMS.append("strict")\n')
    rewrite(package / "main.py", "import zyg.dyn\n", "import zyg.strict\n")
    assert reloaded_by_main(service, 5)["import"] == {"mode": "incremental", "reimported": 2}  # zyg.main, zyg.strict
    (package / "strict.py").write_text(strict + 'registry.ITEMS.append("strict")  # changed\n')
    record = reload_ok(service, 6)
    assert record["import"]["mode"] == "clean"
    assert record["import"]["reason"].startswith("the incremental import failed: RuntimeError: registered twice (")
    assert record["import"]["reason"].endswith("strict.py, line 4)")
    assert values(service)["registry"] == ["plugin1", "strict"]


def test_incremental_imports_clean_when_a_kept_module_outside_the_package_changed(
    start_service: StartService, tmp_path: Path
) -> None:
    """A module the app imports from beside its package (as a top-level main.py's neighbours are) is no snapshot's."""
    service = serve_app(start_service, tmp_path, 2, PYPNM_RELOAD_IMPORT="incremental")
    package, side = tmp_path / "zyg", tmp_path / "side"
    serving_workers(service, 1, 2)
    side.mkdir()
    (side / "__init__.py").write_text("")
    (side / "version.py").write_text('VALUE = "side1"\n')
    (package / "leaf.py").write_text("from side.version import VALUE\n")
    assert reload_ok(service, 2)["import"] == {"mode": "incremental", "reimported": 2}  # zyg.leaf and zyg.main
    assert values(service)["leaf"] == "side1"

    reason = f"the incremental import failed: {side / 'version.py'} changed, and it is not in the app's package"
    # Stamped by the incremental import that imported it first, then by the clean one that imported it again.
    for generation, value in ((3, "side2"), (4, "side3")):
        (side / "version.py").write_text(f'VALUE = "{value}"  # {generation}\n')
        record = reload_ok(service, generation)
        assert record["import"]["mode"] == "clean", record
        assert record["import"]["reason"] == f"{reason}: its module would be kept"
        assert values(service)["leaf"] == value
    assert reload_ok(service, 5)["import"] == {"mode": "incremental", "reimported": 0}  # nothing changed since


def serve_front(start_service: StartService, root: Path) -> Any:
    """`zyg.front:app` from `root`, 2 workers, incremental imports; returned once generation 1 serves."""
    env = base_env(PYPNM_RELOAD_MIN_INTERVAL="0", PYPNM_RELOAD_IMPORT="incremental")
    command = pypnm_command("--app", "zyg.front:app", "--port", "{port}", "--workers", "2")
    service = start_service(command, cwd=root, env=env)
    serving_workers(service, 1, 2)
    return service


def test_incremental_imports_clean_when_the_app_object_outlives_the_reimport(
    start_service: StartService, tmp_path: Path
) -> None:
    """The app made in a module that imports none of the changed ones: re-imported routes would add to it again."""
    package = write_app(tmp_path)
    (package / "core.py").write_text("from fastapi import FastAPI\n\napp = FastAPI()\n" + STATUS_ROUTES)
    routes = 'from zyg.core import app\n\n\n@app.get("/v")\nasync def v() -> dict[str, int]:\n    return {"v": 1}\n'
    (package / "routes.py").write_text(routes)
    (package / "front.py").write_text('import zyg.routes\nfrom zyg.core import app\n\n__all__ = ["app"]\n')
    service = serve_front(start_service, tmp_path)

    rewrite(package / "routes.py", '{"v": 1}', '{"v": 2}')
    record = reload_ok(service, 2)
    assert record["import"]["mode"] == "clean", record
    assert "the app object (zyg.front:app) is the previous generation's" in record["import"]["reason"]
    assert service.get("/v").json() == {"v": 2}


def test_incremental_imports_clean_when_a_kept_router_holds_the_previous_modules_routes(
    start_service: StartService, tmp_path: Path
) -> None:
    """The app module adds a route to a kept module's router: imported again, it adds it again, behind the old one."""
    package = write_app(tmp_path)
    (package / "shelf.py").write_text("from fastapi import APIRouter\n\nrouter = APIRouter()\n")
    (package / "conf.py").write_text("V = 1\n")  # edited, not the app module: the master watches that one
    front = (
        "from fastapi import FastAPI\n\nfrom zyg import conf, shelf\n\napp = FastAPI()\n\n\n"
        'async def extra() -> dict[str, int]:\n    return {"v": conf.V}\n\n\n'
        'shelf.router.add_api_route("/v", extra)\napp.include_router(shelf.router)\n'
    )
    (package / "front.py").write_text(front + STATUS_ROUTES)
    service = serve_front(start_service, tmp_path)

    rewrite(package / "conf.py", "V = 1", "V = 2")
    record = reload_ok(service, 2)
    assert record["import"]["mode"] == "clean", record
    assert "the app still routes to the previous zyg.front.extra" in record["import"]["reason"], record
    assert service.get("/v").json() == {"v": 2}


def test_a_project_under_a_hidden_directory_reloads_on_an_edit(start_service: StartService, tmp_path: Path) -> None:
    """reload_excludes (`.*` among them) are matched below the watched directory, not along the whole path."""
    root = tmp_path / ".projects"  # as under ~/.local/src, or a package installed in a .venv
    service = serve_watching(start_service, root)
    (root / "zyg" / "leaf.py").write_text('VALUE = "leaf2"\n')
    record = reload_finished(service, 1)["last_reload"]
    assert record["outcome"] == "succeeded" and record["source"].startswith("file change: "), record
    serving_workers(service, 2, 1)
    assert values(service)["leaf"] == "leaf2"


def test_editor_files_the_watcher_ignores_are_not_code_to_a_reload(start_service: StartService, tmp_path: Path) -> None:
    """Emacs's lock file (a link to nothing) and backup beside an edited module: reloads stay incremental."""
    service = serve_watching(start_service, tmp_path)
    package = tmp_path / "zyg"
    (package / ".#leaf.py").symlink_to("user@host.4242:1700000000")  # made as a buffer is first modified
    (package / "leaf.py~").write_text('VALUE = "leaf0"\n')  # the backup, made at the first save
    (package / ".leaf.py.swp").write_bytes(b"b0VIM 9.0")
    for generation in (2, 3):
        (package / "leaf.py").write_text(f'VALUE = "leaf{generation}"\n')
        record = reload_finished(service, generation - 1)["last_reload"]
        assert record["outcome"] == "succeeded", record  # was: cannot copy the code: …/.#leaf.py
        assert record["import"] == {"mode": "incremental", "reimported": 2}, record  # zyg.leaf and zyg.main
        serving_workers(service, generation, 1)
        assert values(service)["leaf"] == f"leaf{generation}"
        (package / "leaf.py~").write_text(f'VALUE = "leaf{generation}"\n')  # the next save's backup


# Plugins no import statement names: one imported by a computed name through an aliased import_module,
# one loaded from its file. Each loader module is kept by an incremental import unless it changed itself.
PLUGIN_MAIN = (
    """from fastapi import FastAPI

from plug import by_name, by_path

app = FastAPI()


@app.get("/plugins")
async def plugins() -> dict[str, str]:
    return {"beta": by_name.BETA.VALUE, "gamma": by_path.GAMMA.VALUE}
"""
    + STATUS_ROUTES
)
BY_NAME = """from importlib import import_module as load

BETA = load("plug.plugins." + "beta")
"""
BY_PATH = """import importlib.util
from pathlib import Path

spec = importlib.util.spec_from_file_location("gamma", Path(__file__).parent / "plugins" / "gamma.py")
assert spec is not None and spec.loader is not None
GAMMA = importlib.util.module_from_spec(spec)
spec.loader.exec_module(GAMMA)
"""


def test_plugins_loaded_by_an_aliased_import_module_or_by_path_are_imported_clean(
    start_service: StartService, tmp_path: Path
) -> None:
    package = write_app_package(tmp_path, "plug", PLUGIN_MAIN).parent
    (package / "by_name.py").write_text(BY_NAME)
    (package / "by_path.py").write_text(BY_PATH)
    write_app_package(package, "plugins", "")
    (package / "plugins" / "beta.py").write_text('VALUE = "beta1"\n')
    (package / "plugins" / "gamma.py").write_text('VALUE = "gamma1"\n')
    command = pypnm_command("--app", "plug.main:app", "--port", "{port}", "--workers", "1")
    env = base_env(PYPNM_RELOAD_IMPORT="incremental", PYPNM_RELOAD_MIN_INTERVAL="0")
    service = start_service(command, cwd=tmp_path, env=env)
    assert service.get("/plugins").json() == {"beta": "beta1", "gamma": "gamma1"}

    # The plugin loaded from its file changed (and the other loader, which is then imported again anyway).
    (package / "plugins" / "gamma.py").write_text('VALUE = "gamma2"\n')
    (package / "by_name.py").write_text(BY_NAME + "# changed\n")
    record = reload_by_sighup(service, 1)["last_reload"]
    reason = "a dynamic import in plug/by_path.py, line 4, which the import graph cannot follow"
    assert (record["outcome"], record["import"]) == ("succeeded", {"mode": "clean", "reason": reason}), record
    serving_workers(service, 2, 1)
    assert service.get("/plugins").json() == {"beta": "beta1", "gamma": "gamma2"}
    assert f"generation 2: clean import: {reason}" in service.output()

    # The plugin imported through the aliased import_module changed (and the loader by path).
    (package / "plugins" / "beta.py").write_text('VALUE = "beta2"\n')
    (package / "by_path.py").write_text(BY_PATH + "# changed\n")
    record = reload_by_sighup(service, 2)["last_reload"]
    reason = "a dynamic import in plug/by_name.py, line 3, which the import graph cannot follow"
    assert (record["outcome"], record["import"]) == ("succeeded", {"mode": "clean", "reason": reason}), record
    serving_workers(service, 3, 1)
    assert service.get("/plugins").json() == {"beta": "beta2", "gamma": "gamma2"}


# A route module holding 32 MiB of data (real pages, not zeroes) that each reload changes; the app imports it.
BLOB = '''"""A module with a large table, and a route that reads it."""

import inspect

from fastapi import APIRouter

MARKER = "blob1"
TABLE = bytes(range(256)) * (128 * 1024)
router = APIRouter()


@router.get("/ROUTE")
async def blob() -> dict[str, object]:
    return {"marker": MARKER, "size": len(TABLE), "stack": len(inspect.stack(0))}
'''

BLOB_MAIN = (
    """from fastapi import FastAPI

from mem import blob, other

app = FastAPI()
app.include_router(blob.router)
app.include_router(other.router)
"""
    + STATUS_ROUTES
)


def resident_mib(pid: int) -> float:
    """The process's resident set (its shared pages included), in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["VmRSS"].split()[0]) / 1024


def test_incremental_frees_what_the_dropped_modules_held(start_service: StartService, tmp_path: Path) -> None:
    """The previous generation's module (and app) is freed, not kept by the zygote chain or FastAPI's caches."""
    service, package = start_blob_service(start_service, tmp_path)
    rss, stacks = [], []
    for generation in range(2, 7):
        answer = change_blob(service, package, "blob", generation)
        stacks.append(answer["stack"])
        (worker,) = serving_workers(service, generation, 1)["workers"]
        rss.append(resident_mib(worker["pid"]))
    # Kept, each table would add 32 MiB to the zygote and so to every worker forked from it: 128 MiB over 4 reloads.
    assert rss[-1] - rss[0] < 32, rss
    # Nor by frames: a zygote forked from a zygote does not run on top of its parent's stack.
    assert len(set(stacks)) == 1, stacks


def test_incremental_frees_a_module_that_was_kept_and_frozen(start_service: StartService, tmp_path: Path) -> None:
    """A module kept (and frozen) by the reloads before is freed all the same when it changes.

    Each module changes twice in a row, so the second of those reloads freezes what it keeps,
    the other module with it (reimport.py, "Freezing what is kept"); the next reload changes that
    other module, dropping a module frozen the time before: a full collection, or its table
    would stay for good.
    """
    service, package = start_blob_service(start_service, tmp_path)
    rss = []
    for generation, name in enumerate(["blob", "blob", "other", "other", "blob", "blob", "other"], start=2):
        change_blob(service, package, name, generation)
        (worker,) = serving_workers(service, generation, 1)["workers"]
        rss.append(resident_mib(worker["pid"]))
    # Kept frozen, the table dropped at each switch (the 3rd, 5th and 7th reload) would stay: 3 x 32 MiB.
    assert rss[-1] - rss[0] < 32, rss
    imports = [line for line in service.output().splitlines() if "zygote imported" in line]
    assert sum(": drop " in line for line in imports) == 7, imports
    assert sum(", full release " in line for line in imports) == 3, imports


PAGES = '''"""A generic model, kept: nothing here changes."""

from typing import Generic, TypeVar

from pydantic import BaseModel

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
'''

ITEMS = '''"""A module with a large table and a model that a kept generic model is parametrized with."""

from fastapi import APIRouter
from pydantic import BaseModel

from gen.pages import Page

MARKER = "items1"
TABLE = bytes(range(256)) * (128 * 1024)
router = APIRouter()


class Item(BaseModel):
    marker: str

    def size(self) -> int:  # a method: the class holds this module's globals, the table with them
        return len(TABLE)


@router.get("/items", response_model=Page[Item])
async def items() -> Page[Item]:
    return Page[Item](items=[Item(marker=MARKER)])
'''


def test_incremental_frees_a_model_that_a_kept_generic_model_was_parametrized_with(
    start_service: StartService, tmp_path: Path
) -> None:
    """`Page[Item]`, with `Page` kept and `Item` changed, lets the old `Item` (and its module) go.

    pydantic caches `Page[Item]` under a key that holds `Item` for as long as `Page[Item]` lives,
    which is until a collection: without `reimport.forget_generic_models` the release's collection
    would leave the old module alive, and each reload would keep one more table.
    """
    main = write_app_package(tmp_path, "gen", BLOB_MAIN.replace("mem import blob, other", "gen import items"))
    routers = "app.include_router(blob.router)\napp.include_router(other.router)"
    rewrite(main, routers, "app.include_router(items.router)")
    package = main.parent
    (package / "pages.py").write_text(PAGES)
    (package / "items.py").write_text(ITEMS)
    env = base_env(PYPNM_RELOAD_IMPORT="incremental", PYPNM_RELOAD_MIN_INTERVAL="0")
    service = start_service(
        pypnm_command("--app", "gen.main:app", "--port", "{port}", "--workers", "1"), cwd=tmp_path, env=env
    )
    rss = []
    for generation in range(2, 7):
        (package / "items.py").write_text(ITEMS.replace("items1", f"items{generation}"))
        status = reload_by_sighup(service, generation - 1)
        assert status["last_reload"]["import"] == {"mode": "incremental", "reimported": 2}  # gen.items and gen.main
        assert service.get("/items").json() == {"items": [{"marker": f"items{generation}"}]}
        (worker,) = serving_workers(service, generation, 1)["workers"]
        rss.append(resident_mib(worker["pid"]))
    # Kept, each old module would add its 32 MiB table to the zygote and so to the worker: 128 MiB over 4 reloads.
    assert rss[-1] - rss[0] < 32, rss


DROPPED_ITEMS = """
import enum
from typing import Annotated, Generic, Literal, TypeVar

from pydantic import AfterValidator, BaseModel

from zygote_generics_kept import Page


class Item(BaseModel):
    value: int


class Kind(enum.Enum):
    A = "a"


def double(value: int) -> int:
    return value * 2


B = TypeVar("B", bound=Item)


class Sub(Page[B], Generic[B]):
    pass


def made_in_a_function() -> type:
    return Page[dict[str, Item]]


OF_INTS = Page[int]  # made here first: its __module__ names this module, yet it is of kept code only
NESTED = Page[Page[list[Item]]]
BY_VALUE = Page[Literal[Kind.A]]
VALIDATED = Page[Annotated[int, AfterValidator(double)]]
MADE = made_in_a_function()
"""

KEPT_LATER = """
from zygote_generics_kept import Page

NESTED_INTS = Page[Page[int]]  # takes the Page[int] the dropped module made
"""


def test_forget_generic_models_takes_out_what_names_dropped_code_and_keeps_the_rest() -> None:
    """In this process: a release frees the dropped module's parametrized models, and a kept one's stay the same."""
    names = ("zygote_generics_kept", "zygote_generics_dropped", "zygote_generics_kept_later")
    modules = {name: types.ModuleType(name) for name in names}
    try:
        for name, source in zip(names, (PAGES, DROPPED_ITEMS, KEPT_LATER), strict=True):
            sys.modules[name] = modules[name]
            exec(source, modules[name].__dict__)
        page = modules["zygote_generics_kept"].Page
        nested_ints = modules["zygote_generics_kept_later"].NESTED_INTS
        dropped = modules.pop("zygote_generics_dropped")
        gone = [weakref.ref(dropped.__dict__[name]) for name in ("Item", "Kind", "double", "B", "Sub")]
        del sys.modules[dropped.__name__], dropped
        # pydantic's cache keeps each of them past a collection unless the release takes it out first.
        reimport.release(reimport.NOTHING_FROZEN, ["zygote_generics_dropped"], list(modules))
        assert [ref() for ref in gone] == [None] * len(gone)
        assert page[page[int]] is nested_ints  # what names only kept code is still the one cached
    finally:
        for name in names:
            sys.modules.pop(name, None)


def start_blob_service(start_service: StartService, tmp_path: Path) -> tuple[Service, Path]:
    """One worker serving `mem.main:app` with two 32 MiB route modules (`/blob`, `/other`), importing incrementally."""
    package = write_app_package(tmp_path, "mem", BLOB_MAIN).parent
    for name in ("blob", "other"):
        (package / f"{name}.py").write_text(BLOB.replace("ROUTE", name))
    env = base_env(PYPNM_RELOAD_IMPORT="incremental", PYPNM_RELOAD_MIN_INTERVAL="0")
    service = start_service(
        pypnm_command("--app", "mem.main:app", "--port", "{port}", "--workers", "1"), cwd=tmp_path, env=env
    )
    return service, package


def change_blob(service: Service, package: Path, name: str, generation: int) -> dict[str, Any]:
    """Give module `name` a new marker, reload, and check that only it and the app module were imported again."""
    (package / f"{name}.py").write_text(BLOB.replace("ROUTE", name).replace("blob1", f"blob{generation}"))
    status = reload_by_sighup(service, generation - 1)
    assert status["last_reload"]["import"] == {"mode": "incremental", "reimported": 2}  # mem.<name> and mem.main
    answer: dict[str, Any] = service.get(f"/{name}").json()
    assert (answer["marker"], answer["size"]) == (f"blob{generation}", 32 * 2**20)
    return answer


PATHS_MAIN = (
    """import os

from fastapi import FastAPI

from paths import data, edited
from pypnm.identity import SUPERVISOR_ENV

app = FastAPI()


@app.get("/table")
async def table() -> dict[str, str]:
    return {"marker": edited.MARKER, "table": data.TABLE.read_text().strip()}


@app.get("/runtime")
async def runtime() -> dict[str, str]:
    return {"directory": os.path.dirname(os.environ[SUPERVISOR_ENV])}  # the control socket is in it
"""
    + STATUS_ROUTES
)


def test_paths_kept_modules_computed_at_import_keep_working(start_service: StartService, tmp_path: Path) -> None:
    """A kept module's path into the snapshot it was imported from still leads to the file once that one is gone.

    `paths.data` is imported once, by the first generation, and kept by every incremental import
    after it: its TABLE names the first snapshot's directory, which goes when its generation has
    drained (no rollback window keeps it here).
    """
    package = write_app_package(tmp_path, "paths", PATHS_MAIN).parent
    (package / "data.py").write_text('from pathlib import Path\n\nTABLE = Path(__file__).parent / "table.txt"\n')
    (package / "table.txt").write_text("the table\n")
    (package / "edited.py").write_text('MARKER = "m1"\n')
    env = base_env(PYPNM_RELOAD_IMPORT="incremental", PYPNM_RELOAD_MIN_INTERVAL="0", PYPNM_ROLLBACK_WINDOW="0")
    service = start_service(
        pypnm_command("--app", "paths.main:app", "--port", "{port}", "--workers", "1"), cwd=tmp_path, env=env
    )
    for generation in range(2, 5):
        (package / "edited.py").write_text(f'MARKER = "m{generation}"\n')
        status = reload_by_sighup(service, generation - 1)
        assert status["last_reload"]["import"] == {"mode": "incremental", "reimported": 2}  # paths.edited, paths.main
        serving_workers(service, generation, 1)  # and the generation before has drained: its snapshot is removed
        answer = service.get("/table")
        assert answer.status_code == 200, answer.text
        assert answer.json() == {"marker": f"m{generation}", "table": "the table"}
    runtime = Path(service.get("/runtime").json()["directory"])
    assert sorted(path.name for path in runtime.glob("gen-*") if path.is_symlink()) == ["gen-1", "gen-2", "gen-3"]

    # A data file changed: a clean import, the end of the lineage; its links go with its last generation.
    (package / "table.txt").write_text("the new table\n")
    status = reload_by_sighup(service, 4)
    assert status["last_reload"]["import"]["mode"] == "clean"
    serving_workers(service, 5, 1)
    assert service.get("/table").json() == {"marker": "m4", "table": "the new table"}
    assert [path.name for path in runtime.iterdir() if path.is_symlink()] == []
    assert [path.name for path in runtime.glob("gen-*")] == ["gen-5"]


def test_a_line_of_incremental_imports_ends_with_a_clean_one(start_service: StartService, tmp_path: Path) -> None:
    """After `reload_import_line` incremental imports in a row the next one imports clean, then a new line starts."""
    package = write_app_package(tmp_path, "paths", PATHS_MAIN).parent
    (package / "data.py").write_text('from pathlib import Path\n\nTABLE = Path(__file__).parent / "table.txt"\n')
    (package / "table.txt").write_text("the table\n")
    (package / "edited.py").write_text('MARKER = "m1"\n')
    env = base_env(
        PYPNM_RELOAD_IMPORT="incremental",
        PYPNM_RELOAD_IMPORT_LINE="3",
        PYPNM_RELOAD_MIN_INTERVAL="0",
        PYPNM_ROLLBACK_WINDOW="0",
    )
    service = start_service(
        pypnm_command("--app", "paths.main:app", "--port", "{port}", "--workers", "1"), cwd=tmp_path, env=env
    )
    modes = []
    for generation in range(2, 8):
        (package / "edited.py").write_text(f'MARKER = "m{generation}"\n')
        modes.append(reload_by_sighup(service, generation - 1)["last_reload"]["import"])
    incremental = {"mode": "incremental", "reimported": 2}
    afresh = {"mode": "clean", "reason": "3 incremental imports in a row: this one starts afresh"}
    assert modes == [incremental] * 3 + [afresh] + [incremental] * 2
    assert service.get("/table").json() == {"marker": "m7", "table": "the table"}


def zygote_line(service: Service, generation: int) -> str:
    """The master's "zygote imported" line of `generation`."""
    pattern = re.compile(rf"zygote imported pid=(\d+) generation={generation} .*")
    found: re.Match[str] = wait_until(lambda: pattern.search(service.output()), timeout=10)
    return found.group(0)


def standing_by(service: Service, zygote: int, log: Callable[[], str] | None = None) -> int:
    """The standby forked by `zygote`, once it is ready: its log line (in `log`, else the output) and the status."""

    def ready() -> int | None:
        pids = supervisor_status(service)["master"]["standby_pids"]
        said = re.findall(r"standby pid=(\d+) of generation \d+'s zygote ready", (log or service.output)())
        return pids[0] if len(pids) == 1 and said and int(said[-1]) == pids[0] else None

    pid: int = wait_until(ready, timeout=20)
    stat = process_stat(pid)
    assert stat is not None and int(stat[1]) == zygote, (stat, zygote)  # its parent: the serving zygote
    return pid


def test_a_standby_is_forked_ahead_of_the_next_reload_and_goes_on_as_its_zygote(
    start_service: StartService, tmp_path: Path
) -> None:
    """Once a reload is over, the serving zygote forks the next one's, which drops what that reload dropped.

    A reload that drops the same modules has it go on as its zygote; one that drops others forks
    its zygote as usual, and the standby leaves, having imported nothing. So does a standby at stop.
    """
    env = {"PYPNM_RELOAD_IMPORT": "incremental", "PYPNM_RELOAD_STANDBY": "ahead"}
    service = serve_app(start_service, tmp_path, 2, "--log-level", "debug", **env)
    package = tmp_path / "zyg"
    serving_workers(service, 1, 2)
    assert supervisor_status(service)["master"]["standby_pids"] == []  # a clean import: nothing to guess from
    (package / "leaf.py").write_text('VALUE = "leaf2"\n')
    reload_ok(service, 2)
    assert "standby" not in zygote_line(service, 2)
    zygote = supervisor_status(service)["master"]["zygote_pids"][0]
    standby = standing_by(service, zygote)  # generation 1 drained: generation 2's zygote forked it
    assert standby not in imports(tmp_path)  # it dropped zyg.leaf and zyg.main, and imported nothing yet

    (package / "leaf.py").write_text('VALUE = "leaf3"\n')  # the same module again: zyg.leaf and zyg.main dropped
    assert reload_ok(service, 3)["import"] == {"mode": "incremental", "reimported": 2}
    line = zygote_line(service, 3)
    assert "from a standby, which dropped and released before the reload needed it" in line, line
    steps = {name: int(ms) for name, ms in re.findall(r"(drop|release|paths|import|routes) (\d+)ms", line)}
    assert set(steps) == {"drop", "release", "paths", "import", "routes"}, line
    cpu = re.search(r"; CPU (\d+)ms of (\d+)ms", line)
    assert cpu and int(cpu[2]) == sum(steps.values()) and int(cpu[1]) <= int(cpu[2]) + 10, line
    assert int(line.split("pid=")[1].split()[0]) == standby == imports(tmp_path)[-1]  # it imported generation 3
    assert values(service)["leaf"] == "leaf3"
    standby = standing_by(service, standby)  # the next one, forked by the zygote it became

    (package / "names.py").write_text('NAME = "name2"\n')  # another module: the standby dropped zyg.leaf, not this
    assert reload_ok(service, 4)["import"] == {"mode": "incremental", "reimported": 2}
    assert "standby" not in zygote_line(service, 4)
    assert f"standby pid={standby} not used: the reload drops other modules" in service.output()
    assert standby not in imports(tmp_path)  # it imported nothing
    wait_until(lambda: not pid_alive(standby), timeout=10)  # and it left
    assert (values(service)["leaf"], values(service)["name"]) == ("leaf3", "name2")

    standby = standing_by(service, imports(tmp_path)[-1])  # dropping zyg.names and zyg.main, for the next reload
    assert service.stop() == 0
    wait_until(lambda: not pid_alive(standby), timeout=10)  # it leaves with the service


def serve_after_a_reload(start_service: StartService, tmp_path: Path, **env: str) -> tuple[Service, int]:
    """A 1-worker service with standbys forked ahead, once generation 2 (leaf.py edited) serves alone; its zygote."""
    settings = {"PYPNM_RELOAD_IMPORT": "incremental", "PYPNM_RELOAD_STANDBY": "ahead", **env}
    service = serve_app(start_service, tmp_path, 1, **settings)
    serving_workers(service, 1, 1)
    (tmp_path / "zyg" / "leaf.py").write_text('VALUE = "leaf2"\n')
    reload_by_sighup(service, 1)
    zygote: int = serving_workers(service, 2, 1)["master"]["zygote_pids"][0]
    return service, zygote


def test_a_standby_lost_to_a_failed_reload_or_a_kill_is_forked_again(
    start_service: StartService, tmp_path: Path
) -> None:
    """With `ahead`: a failed reload that took the standby leaves one for the fixing reload; a killed one is noticed."""
    service, zygote = serve_after_a_reload(start_service, tmp_path, PYPNM_ROLLBACK_WINDOW="0")
    leaf = tmp_path / "zyg" / "leaf.py"
    taken = standing_by(service, zygote)

    leaf.write_text("VALUE = (\n")  # a syntax error: the reload fails at the snapshot, before it needs a zygote
    assert reload_by_sighup(service, 2)["last_reload"]["outcome"] == "failed"
    assert supervisor_status(service)["master"]["standby_pids"] == [taken]  # it still fits: it stays

    leaf.write_text('raise RuntimeError("broken")\n')  # the reload takes the standby, whose import fails
    assert reload_by_sighup(service, 2)["last_reload"]["outcome"] == "failed"
    wait_until(lambda: not pid_alive(taken), timeout=10)  # it was the candidate's zygote
    standby = standing_by(service, zygote)  # nothing drains: forked as the failed reload ended
    assert standby != taken

    os.kill(standby, signal.SIGKILL)  # the OOM killer, or an operator, while it waits
    wait_until(lambda: supervisor_status(service)["master"]["standby_pids"] == [], timeout=10)
    assert f"standby pid={standby} ended while standing by" in service.output()

    leaf.write_text('VALUE = "leaf5"\n')  # the fix: its reload forks a standby as it begins, and takes it
    status = reload_by_sighup(service, 4)  # generations 3 and 4 were the failed reloads
    assert status["last_reload"]["outcome"] == "succeeded", status["last_reload"]
    line = zygote_line(service, status["generation"])
    assert "from a standby" in line and f"pid={standby} " not in line, line
    assert values(service)["leaf"] == "leaf5"


# A leaf module whose workers start serving, then crash: the generation is rolled back.
CRASHING_LEAF = """import os
import threading
import time

VALUE = "crashing"


def startup():
    threading.Thread(target=lambda: (time.sleep(3), os._exit(3)), daemon=True).start()
"""


def test_a_rollback_stops_the_standby_of_the_generation_it_rolls_back(
    start_service: StartService, tmp_path: Path
) -> None:
    service, _ = serve_after_a_reload(start_service, tmp_path, PYPNM_ROLLBACK_CRASHES="2")
    (tmp_path / "zyg" / "leaf.py").write_text(CRASHING_LEAF)  # served, then its workers crash: rolled back
    reload_by_sighup(service, 2)
    bad = standing_by(service, serving_workers(service, 3, 1)["master"]["zygote_pids"][0])  # of generation 3's

    def rolled_back() -> dict[str, Any] | None:
        status = supervisor_status(service)
        return status if (status["last_reload"] or {}).get("outcome") == "rolled_back" else None

    status = wait_until(rolled_back, timeout=40)
    assert status["last_reload"]["import"] == {"mode": "clean"}  # a rollback imports clean: nothing to guess from
    wait_until(lambda: not pid_alive(bad), timeout=10)
    assert supervisor_status(service)["master"]["standby_pids"] == []
    assert values(service)["leaf"] == "leaf1"  # generation 2 was replaced before it proved itself: passed over


def test_a_standby_leaves_with_a_killed_master(start_service: StartService, tmp_path: Path) -> None:
    service, zygote = serve_after_a_reload(start_service, tmp_path)
    standby = standing_by(service, zygote)
    service.signal(signal.SIGKILL)
    wait_until(lambda: not pid_alive(standby), timeout=10)  # end-of-file on its channel: it exits


def test_a_standby_moves_to_the_new_log_file_on_sigusr1(start_service: StartService, tmp_path: Path) -> None:
    """A standby may wait for hours: logrotate's SIGUSR1 to the master reaches it as it reaches the workers."""
    path = tmp_path / "pypnm.log"
    service, zygote = serve_after_a_reload(
        start_service, tmp_path, PYPNM_LOG_FILE=str(path), PYPNM_LOG_FILE_MAX_BYTES="0"
    )
    standby = standing_by(service, zygote, path.read_text)
    old_inode = path.stat().st_ino
    assert old_inode in open_inodes(standby)

    path.rename(tmp_path / "pypnm.log.1")  # logrotate's `create` mode, then its postrotate SIGUSR1
    path.touch()
    service.signal(signal.SIGUSR1)
    wait_until(lambda: path.stat().st_ino in (inodes := open_inodes(standby)) and old_inode not in inodes, timeout=10)
    assert pid_alive(standby)


def open_inodes(pid: int) -> set[int]:
    """The inodes of the files `pid` has open."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            inodes.add(os.stat(f"/proc/{pid}/fd/{fd}").st_ino)
    return inodes


def test_by_default_a_standby_is_forked_as_the_reload_begins(start_service: StartService, tmp_path: Path) -> None:
    """Without --reload, `reload_standby` is `at_reload`: none waits between reloads, and the reload forks its own."""
    service = serve_app(start_service, tmp_path, 1, PYPNM_RELOAD_IMPORT="incremental")
    package = tmp_path / "zyg"
    serving_workers(service, 1, 1)
    for generation in (2, 3):
        (package / "leaf.py").write_text(f'VALUE = "leaf{generation}"\n')
        reload_by_sighup(service, generation - 1)
        serving_workers(service, generation, 1)  # and the generation before has drained
        time.sleep(1)  # one forked ahead would be listed from its fork on, right after the drain
        assert supervisor_status(service)["master"]["standby_pids"] == []
    assert "from a standby, which dropped and released before the reload needed it" in zygote_line(service, 3)
    assert values(service)["leaf"] == "leaf3"


def test_with_reload_a_standby_waits_ahead_of_the_next_edit(start_service: StartService, tmp_path: Path) -> None:
    """`--reload` (development, where the file edited last is edited again) forks the standby ahead by default."""
    service = serve_watching(start_service, tmp_path)
    package = tmp_path / "zyg"
    (package / "leaf.py").write_text('VALUE = "leaf2"\n')
    zygote = serving_workers(service, 2, 1)["master"]["zygote_pids"][0]
    standby = standing_by(service, zygote)

    (package / "leaf.py").write_text('VALUE = "leaf3"\n')
    serving_workers(service, 3, 1)
    line = zygote_line(service, 3)
    assert "from a standby" in line and int(line.split("pid=")[1].split()[0]) == standby, line
    assert values(service)["leaf"] == "leaf3"


def test_a_release_walks_everything_when_what_it_drops_may_be_frozen() -> None:
    """What the previous zygote froze (what it kept) needs a full collection when dropped."""
    kept_last_time = reimport.Frozen(frozenset({"app.kept"}))
    assert not kept_last_time.needs_full_collection(["app.edited", "app.main"])  # imported by the previous zygote
    assert kept_last_time.needs_full_collection(["app.kept", "app.main"])
    assert not reimport.NOTHING_FROZEN.needs_full_collection(["app.main"])  # a clean import froze nothing of the app


def test_a_release_freezes_only_when_the_same_modules_were_dropped_again() -> None:
    last = reimport.Frozen(last_drop=frozenset({"app.edited", "app.main"}))
    assert last.worth_freezing(["app.main", "app.edited"])  # the same file edited again
    assert not last.worth_freezing(["app.other", "app.main"])  # another one: the next edit may be another again
    assert not reimport.NOTHING_FROZEN.worth_freezing(["app.main"])
