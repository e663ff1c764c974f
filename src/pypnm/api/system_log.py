"""System Operations: `GET /pypnm/system/log/download`, the service's current log file as a download.

Under `/pypnm/system`, so the System Operations guard (access.py) lets in the same callers
as the reload. The file is the one every process writes (`log_file_in_use`: under the
supervisor the master's, which a reload does not change).

It is streamed in 64 KiB chunks from the descriptor opened when the request came, up to
the size the file had then: lines appended while it streams are left for the next
download, and a rotation meanwhile changes nothing, since the renamed file is the one
open. The file is never read whole, and each chunk is read in a worker thread.

Not Starlette's `FileResponse`, although it streams in chunks too: it takes the size from
a `stat` of the path, then opens the path again and reads to the end of the file. A log
file grows between the two and while it is sent, so it would send more bytes than its
own `Content-Length` (the server then cuts the connection), and a rotation between the
`stat` and the open would send another file than the one measured.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterator
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import StreamingResponse

from pypnm.api.web_service import ErrorDetail
from pypnm.logs import log_file_in_use

router = APIRouter(prefix="/pypnm/system/log", tags=["PyPNM System Log"])

CHUNK_SIZE = 64 * 1024
_PLAIN_NAME = re.compile(r"[A-Za-z0-9._+-]+")


def read_up_to(fd: int, size: int) -> Iterator[bytes]:
    """The first `size` bytes of the open file `fd`, a chunk at a time; closes `fd` when done or dropped."""
    try:
        offset = 0
        while offset < size:
            chunk = os.pread(fd, min(CHUNK_SIZE, size - offset), offset)
            if not chunk:  # cut shorter meanwhile (truncated in place): what there was has been sent
                return
            offset += len(chunk)
            yield chunk
    finally:
        os.close(fd)


def content_disposition(filename: str) -> str:
    """`attachment; filename="<name>"`, with an RFC 6266 `filename*` when the name is not plain ASCII."""
    if _PLAIN_NAME.fullmatch(filename):
        return f'attachment; filename="{filename}"'
    fallback = re.sub(r"[^A-Za-z0-9._+-]", "_", filename)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(filename, safe='')}"


@router.get(
    "/download",
    summary="Download the current log file",
    response_class=StreamingResponse,
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "The log file, as it was"},
        404: {"model": ErrorDetail, "description": "No log file is configured, or it does not exist"},
    },
)
def download_log(request: Request) -> StreamingResponse:
    """Stream the current log file (`log_file`) as `text/plain`, as an attachment named like the file.

    What is sent is the file as it was when the request came: lines written meanwhile are not.
    Older lines are in the rotated files beside it (`<log_file>.1`, ...), which this does not send.
    """
    path = log_file_in_use(request.app.state.settings)
    if path is None:
        raise HTTPException(
            status_code=404,
            detail="No log file is configured: pypnm logs to stderr. Set log_file (PYPNM_LOG_FILE, or log_file "
            "in the settings file) and restart pypnm to have every process write its lines there",
        )
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, NotADirectoryError):
        raise HTTPException(status_code=404, detail=f"Log file not found at: {path}") from None
    except OSError as exc:
        raise HTTPException(
            status_code=500, detail=f"Cannot read the log file at: {path}: {exc.strerror or exc}"
        ) from None
    status = os.fstat(fd)
    if not stat.S_ISREG(status.st_mode):
        os.close(fd)
        raise HTTPException(status_code=404, detail=f"Log file not found at: {path} (it is not a regular file)")
    return StreamingResponse(
        read_up_to(fd, status.st_size),
        media_type="text/plain",
        headers={"Content-Disposition": content_disposition(path.name), "Content-Length": str(status.st_size)},
    )
