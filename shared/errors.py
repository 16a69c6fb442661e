"""Domain errors carry their HTTP status; one handler renders them as ``{"detail": …}``.

422 is for payload validation only, and its body names each failing field (``loc``) without
echoing the rejected input back (a password that is too short stays out of the response).
"""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from shared.db import database_unavailable
from shared.metrics import CLIENT_CLOSED_REQUEST

logger = logging.getLogger(__name__)


class DomainError(Exception):
    status_code: ClassVar[int] = 400
    detail: ClassVar[str] = "Bad request"
    headers: ClassVar[dict[str, str] | None] = None

    def __init__(self, detail: str | None = None) -> None:
        self.message = detail or self.detail
        super().__init__(self.message)

    def response_headers(self) -> dict[str, str] | None:
        return self.headers


class NotFound(DomainError):
    status_code = 404
    detail = "Not found"


class Forbidden(DomainError):
    status_code = 403
    detail = "Forbidden"


class TooManyRequests(DomainError):
    status_code = 429
    detail = "Too many requests; try again later"

    def __init__(self, detail: str | None = None, *, retry_after_seconds: int) -> None:
        super().__init__(detail)
        self.retry_after_seconds = max(1, retry_after_seconds)

    def response_headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after_seconds)}


class Conflict(DomainError):
    status_code = 409
    detail = "Conflict"


class Unauthorized(DomainError):
    status_code = 401
    detail = "Not authenticated"
    headers: ClassVar[dict[str, str] | None] = {"WWW-Authenticate": "Bearer"}


class ServiceUnavailable(DomainError):
    status_code = 503
    detail = "Service temporarily unavailable"
    headers: ClassVar[dict[str, str] | None] = {"Retry-After": "5"}


def validation_detail(errors: Any) -> list[dict[str, Any]]:
    return [
        {"loc": list(error.get("loc", ())), "msg": error.get("msg", ""), "type": error.get("type")}
        for error in errors
    ]


async def _domain_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DomainError)
    return JSONResponse(
        {"detail": exc.message}, status_code=exc.status_code, headers=exc.response_headers()
    )


async def _database_error_handler(request: Request, exc: Exception) -> JSONResponse:
    if database_unavailable(exc):
        logger.warning("database unavailable", extra={"error": repr(exc), "path": request.url.path})
        return JSONResponse(
            {"detail": "The database is unavailable; try again shortly"},
            status_code=503,
            headers={"Retry-After": "5"},
        )
    return await _unexpected_error_handler(request, exc)


async def _unexpected_error_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.error("unexpected error", exc_info=exc, extra={"path": request.url.path})
    return JSONResponse({"detail": "Internal Server Error"}, status_code=500)


async def _validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"detail": validation_detail(exc.errors())}, status_code=422)


# FastAPI's answer to a JSON body its parser raised on with anything but a JSONDecodeError:
# bytes that are not UTF-8, an integer beyond Python's digit limit, nesting beyond its recursion
# limit.
_UNPARSED_BODY = "There was an error parsing the body"


async def _client_disconnect_handler(request: Request, exc: Exception) -> Response:
    """The client went away before its request body arrived whole: its own doing, not an
    error of ours (no traceback, no 5xx), but counted (``http_server_client_aborts_total``)."""
    logger.info(
        "client went away before its request body arrived", extra={"path": request.url.path}
    )
    return Response(status_code=CLIENT_CLOSED_REQUEST)


async def _http_error_handler(request: Request, exc: Exception) -> Response:
    """FastAPI's, except that a body it could not parse is a 422 naming ``body``, as a body
    that is not JSON at all is, not a 400 with a string ``detail``; and a body the client
    stopped sending is a client abort."""
    assert isinstance(exc, HTTPException)
    if isinstance(exc.__cause__, ClientDisconnect):
        return await _client_disconnect_handler(request, exc.__cause__)
    if exc.status_code == 400 and exc.detail == _UNPARSED_BODY:
        detail = [{"loc": ["body"], "msg": "JSON decode error", "type": "json_invalid"}]
        return JSONResponse({"detail": detail}, status_code=422)
    return await http_exception_handler(request, exc)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DomainError, _domain_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_error_handler)
    app.add_exception_handler(HTTPException, _http_error_handler)
    app.add_exception_handler(ClientDisconnect, _client_disconnect_handler)
    # A dependency that is away (the database, mostly) surfaces as one of these.
    for outage in (SQLAlchemyError, OSError, TimeoutError):
        app.add_exception_handler(outage, _database_error_handler)
    app.add_exception_handler(Exception, _unexpected_error_handler)
