"""Reading a request body in ASGI middleware and handing it on unchanged."""
from __future__ import annotations

from typing import Optional


class BodyTooLarge(Exception):
    pass


async def read_body(receive, limit: int) -> Optional[bytes]:
    """The whole body (None if the client went away); BodyTooLarge past ``limit`` bytes."""
    chunks, size, more = [], 0, True
    while more:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        size += len(chunks[-1])
        more = message.get("more_body", False)
        if size > limit:
            raise BodyTooLarge()
    return b"".join(chunks)


def replaying(body: bytes, receive):
    """A ``receive`` that yields ``body`` once, then whatever the client sends next."""
    replayed = False

    async def replay():
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
