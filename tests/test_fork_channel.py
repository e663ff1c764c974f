"""The master's end of a zygote's channel (spawner.ForkChannel): requests sent at once, answers in order.

In-process: the test plays the zygote on the other end of a real SEQPACKET socketpair, speaking
the real protocol. The channel is opened the way a standby becomes a zygote (`Zygote.from_standby`).
"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable

import pytest

from pypnm.supervisor import protocol
from pypnm.supervisor.protocol import Spawned, SpawnRequest, WorkerExited, WorkerSpec, ZygoteReady, ZygoteRequest
from pypnm.supervisor.spawner import ExitTable, SpawnError, Standby, Zygote

SPEC = WorkerSpec(app="app.main:app", generation=2, snapshot_dir="/nowhere", packages=["app"], source_dirs={})


class Peer:
    """The zygote's end: reads what the master sends, answers what the test says."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock

    async def read(self) -> protocol.TemplateMessage:
        data = await asyncio.get_running_loop().sock_recv(self.sock, protocol.MAX_MESSAGE)
        return protocol.decode_template(data)

    async def say(self, message: protocol.TemplateMessage) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, protocol.encode_template(message))


async def opened_zygote() -> tuple[Zygote, Peer]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    peer = Peer(theirs)
    zygote = await Zygote.from_standby(Standby(4242, frozenset(), ours, ExitTable()), request())
    assert isinstance(await peer.read(), ZygoteRequest)
    await peer.say(ZygoteReady(4242, 10, 0))
    return await zygote.imported(), peer


def request() -> ZygoteRequest:
    return ZygoteRequest(SPEC, 10, [])


def run(test: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(10):  # a channel that waits for an answer before it sends the next request hangs
            await test()

    asyncio.run(bounded())


def spawn(zygote: Zygote) -> asyncio.Future[int]:
    read_end, write_end = os.pipe()
    os.close(write_end)
    future = asyncio.ensure_future(zygote.spawn(SPEC, [read_end]))
    future.add_done_callback(lambda _: os.close(read_end))
    return future


def test_requests_go_out_at_once_and_each_takes_its_own_answer() -> None:
    async def test() -> None:
        zygote, peer = await opened_zygote()
        spawns = [spawn(zygote) for _ in range(3)]
        # All three arrive before the zygote answers any: it forks them back to back.
        assert [type(await peer.read()) for _ in range(3)] == [SpawnRequest] * 3
        await peer.say(Spawned(101))
        await peer.say(WorkerExited(99, 256))  # an exit report in between answers no request
        await peer.say(Spawned(102))
        await peer.say(Spawned(103))
        assert await asyncio.gather(*spawns) == [101, 102, 103]
        assert await zygote.exit_status(99) == 256

    run(test)


def test_a_request_given_up_keeps_its_place_in_the_order() -> None:
    async def test() -> None:
        zygote, peer = await opened_zygote()
        given_up = spawn(zygote)
        await peer.read()
        given_up.cancel()  # a reload's timeout: its answer still comes, and must not go to the next request
        kept = spawn(zygote)
        await peer.read()
        await peer.say(Spawned(201))
        await peer.say(Spawned(202))
        assert await kept == 202

    run(test)


def test_requests_waiting_when_the_zygote_exits_fail_with_the_reason() -> None:
    async def test() -> None:
        zygote, peer = await opened_zygote()
        spawns = [spawn(zygote) for _ in range(2)]
        await peer.read()
        await peer.read()
        await peer.say(Spawned(301))
        peer.sock.close()
        assert await spawns[0] == 301
        with pytest.raises(SpawnError, match=r"the zygote pid=4242 exited"):
            await spawns[1]

    run(test)
