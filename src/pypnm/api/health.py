"""`GET /health`: a cheap liveness answer for probes and for the reload smoke check."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from pypnm import __version__

router = APIRouter(tags=["Health"])


class Health(BaseModel):
    status: str
    version: str


@router.get("/health", response_model=Health, summary="Liveness probe")
async def health() -> Health:
    return Health(status="ok", version=__version__)
