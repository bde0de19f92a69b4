"""Bad requests as FastChat reports them: ``{"object": "error", "message", "code"}``."""
from __future__ import annotations

from fastchat.constants import ErrorCode
from starlette.responses import JSONResponse


class Invalid(Exception):
    """A request that cannot be served as sent; becomes a 4xx with this message."""

    def __init__(self, message: str, code: int = ErrorCode.VALIDATION_TYPE_ERROR):
        super().__init__(message)
        self.code = code


def error_response(code: int, message: str, status: int = 400) -> JSONResponse:
    return JSONResponse({"object": "error", "message": message, "code": int(code)}, status_code=status)
