"""The body of every error answer: `{"error": {"message", "type", "field"}}`, `field` naming the offending part of
the request (README, "Serving")."""
from __future__ import annotations

from fastapi.responses import JSONResponse


def error(status: int, message: str, field: str | None = None, headers: dict | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large",
            503: "overloaded_error", 504: "timeout_error"}.get(status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "field": field}}, status, headers=headers)
