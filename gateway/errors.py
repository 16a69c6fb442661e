"""The gateway's own errors: ``{error, message, path, timestamp, status_code}``."""

from __future__ import annotations

from datetime import UTC, datetime

from fastapi.responses import JSONResponse


class GatewayError(Exception):
    status_code = 500
    error = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(GatewayError):
    status_code = 400
    error = "bad_request"


class NoRoute(GatewayError):
    status_code = 404
    error = "not_found"


class PayloadTooLarge(GatewayError):
    status_code = 413
    error = "payload_too_large"


class BadGateway(GatewayError):
    status_code = 502
    error = "bad_gateway"


class ServiceUnavailable(GatewayError):
    status_code = 503
    error = "service_unavailable"


class GatewayTimeout(GatewayError):
    status_code = 504
    error = "gateway_timeout"


def error_response(exc: GatewayError, path: str, request_id: str | None) -> JSONResponse:
    headers = {"X-Request-ID": request_id} if request_id else None
    return JSONResponse(
        {
            "error": exc.error,
            "message": exc.message,
            "path": path,
            "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "status_code": exc.status_code,
        },
        status_code=exc.status_code,
        headers=headers,
    )
