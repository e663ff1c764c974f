"""The reload engine: a master that owns the sockets, and generations of uvicorn workers."""
