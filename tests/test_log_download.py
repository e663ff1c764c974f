"""`GET /pypnm/system/log/download` (issue 9.4), against real servers on 127.0.0.1.

The download is the file as it was when the request came (also while it is appended to),
streamed: a worker sending a file of tens of MB keeps its memory (VmHWM) small. 404 when
no log file is configured or it does not exist; refused to callers the reload refuses.
"""

from __future__ import annotations

import hashlib
import re
import sys
from pathlib import Path

import httpx

from conftest import RELOAD_PATH, Service, StartService, base_env, pypnm_command

DOWNLOAD_PATH = "/pypnm/system/log/download"
IDENTITY = {"Accept-Encoding": "identity"}
TOKEN = "download-token-0123456789"


def serve_with_log(start_service: StartService, path: Path, *args: str, **env: str) -> Service:
    return start_service(
        pypnm_command("--port", "{port}", *args),
        env=base_env(PYPNM_LOG_FILE=str(path), PYPNM_LOG_FILE_MAX_BYTES="0", **env),
    )


def vm_hwm(pid: int) -> int:
    """The most resident memory the process ever had, in bytes (VmHWM)."""
    text = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^VmHWM:\s+(\d+) kB$", text, re.MULTILINE)
    assert found, text
    return int(found.group(1)) * 1024


def test_download_is_the_log_file(start_service: StartService, tmp_path: Path) -> None:
    path = tmp_path / "pypnm.log"
    service = serve_with_log(start_service, path)
    assert service.get("/health").status_code == 200

    response = service.get(DOWNLOAD_PATH, headers=IDENTITY)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "text/plain; charset=utf-8"
    assert response.headers["content-disposition"] == 'attachment; filename="pypnm.log"'
    assert int(response.headers["content-length"]) == len(response.content) > 0
    assert response.content == path.read_bytes()[: len(response.content)]  # the file, as it was then
    assert b" pypnm.access: GET /health 200 " in response.content

    # gzip when the client takes it (httpx does by default): the same bytes once unpacked
    compressed = service.get(DOWNLOAD_PATH, headers={"Accept-Encoding": "gzip"})
    assert compressed.headers["content-encoding"] == "gzip"
    unpacked = compressed.content  # httpx unpacks it
    assert unpacked == path.read_bytes()[: len(unpacked)] and len(unpacked) >= len(response.content)


def test_lines_written_while_it_streams_are_not_sent(start_service: StartService, tmp_path: Path) -> None:
    path = tmp_path / "pypnm.log"
    path.write_bytes(b"".join(b"old line %07d %s\n" % (n, b"z" * 80) for n in range(60_000)))  # ~5.6 MB
    service = serve_with_log(start_service, path)
    size_before = path.stat().st_size
    with httpx.stream("GET", service.base_url + DOWNLOAD_PATH, headers=IDENTITY, timeout=30.0) as response:
        assert response.status_code == 200
        length = int(response.headers["content-length"])
        chunks = response.iter_bytes()
        first = next(chunks)
        with path.open("ab") as log:  # appended after the download started
            log.write(b"APPENDED WHILE STREAMING\n")
        body = first + b"".join(chunks)
    assert length >= size_before and len(body) == length
    assert b"APPENDED WHILE STREAMING" not in body
    assert body == path.read_bytes()[:length]


def test_a_large_file_is_streamed_in_small_memory(start_service: StartService, tmp_path: Path) -> None:
    path = tmp_path / "big.log"
    line = b"2026-11-24T11:08:15.672Z INFO [worker pid=1 gen=1] pypnm.access: " + b"x" * 120 + b"\n"
    with path.open("wb") as log:
        for _ in range(48):
            log.write(line * (1024 * 1024 // len(line)))
    size = path.stat().st_size
    assert size > 40 * 1024 * 1024
    service = serve_with_log(start_service, path)
    (worker,) = service.status()["workers"]
    before = vm_hwm(worker["pid"])

    digest = hashlib.sha256()
    received = 0
    with httpx.stream("GET", service.base_url + DOWNLOAD_PATH, headers=IDENTITY, timeout=60.0) as response:
        assert response.status_code == 200
        for chunk in response.iter_bytes():
            digest.update(chunk)
            received += len(chunk)
    grown = vm_hwm(worker["pid"]) - before
    assert received >= size
    expected = hashlib.sha256()
    with path.open("rb") as log:
        for _ in range(received // (1 << 20) + 1):
            expected.update(log.read(min(1 << 20, received - log.tell())))
    assert digest.hexdigest() == expected.hexdigest()
    assert grown < 16 * 1024 * 1024, f"the worker's peak memory grew by {grown} bytes for a {size}-byte file"


def test_no_log_file_configured_is_404_saying_how(start_service: StartService) -> None:
    service = start_service(pypnm_command("--port", "{port}"))
    response = service.get(DOWNLOAD_PATH)
    assert response.status_code == 404
    detail = response.json()["detail"]
    assert detail.startswith("No log file is configured")
    assert "log_file" in detail and "PYPNM_LOG_FILE" in detail


def test_a_missing_log_file_is_404_naming_it(start_service: StartService, tmp_path: Path) -> None:
    # Under a plain uvicorn nobody writes the log_file, so it stays missing.
    missing = tmp_path / "logs" / "pypnm.log"
    command = [sys.executable, "-m", "uvicorn", "pypnm.main:app", "--host", "127.0.0.1", "--port", "{port}"]
    service = start_service(command, env=base_env(PYPNM_LOG_FILE=str(missing)))
    response = service.get(DOWNLOAD_PATH)
    assert response.status_code == 404
    assert response.json() == {"detail": f"Log file not found at: {missing}"}


def test_refused_to_whom_the_reload_is_refused(start_service: StartService, tmp_path: Path) -> None:
    path = tmp_path / "pypnm.log"
    service = serve_with_log(start_service, path, PYPNM_TRUSTED_NETWORKS="[]", PYPNM_API_TOKENS=f'{{"ops": "{TOKEN}"}}')
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    cross_site = {**bearer, "Origin": "http://evil.example"}
    for headers, status in (({}, 403), ({"Authorization": "Bearer wrong-token-0123456789"}, 401), (cross_site, 403)):
        refused = service.get(DOWNLOAD_PATH, headers=headers)
        reload_refused = service.get(RELOAD_PATH, headers=headers)
        assert refused.status_code == reload_refused.status_code == status
        assert refused.json()["detail"] == reload_refused.json()["detail"]
        assert b"pypnm.access" not in refused.content
    allowed = service.get(DOWNLOAD_PATH, headers={**bearer, **IDENTITY})
    assert allowed.status_code == 200
    assert allowed.content == path.read_bytes()[: len(allowed.content)]
