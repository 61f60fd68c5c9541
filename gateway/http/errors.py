"""Every error the API answers has one shape: `{code, message, field}` with a fitting status.

Handlers raise `ApiError`; the middleware renders it, and is the one place that maps what is
not the handler's to decide (and `ProtocolLog` what fails before any handler): a journal that
cannot take the request's write now is a 503 the caller may retry (`JournalUnavailable`:
unreachable; `StoreOverloaded`: at capacity, shed with `Retry-After`); a client that hung up
mid-request is counted, not logged (any caller could flood the log with tracebacks); anything
else unexpected is a 500 that names no internals, so a bad request can never crash the worker.

It is also the one place an error answer is rendered, and every answer's `message` and `field`
pass through the app's `Redactor` there: both may quote what the caller sent (a JSON key, a
header's value, a duplicate name), and a card number or a secret sent by mistake must not come
back in an answer that proxies, clients and their logs keep (DESIGN rule 6).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.log import server_logger
from pydantic import ValidationError

from gateway.journal.errors import JournalUnavailable, StoreOverloaded
from gateway.metrics import Metrics
from gateway.redaction import Redactor

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
JOURNAL_RETRY_AFTER_S = "2"  # about one readiness probe: by then the load balancer knows


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or {}

    def response(self, redactor: Redactor) -> web.Response:
        """The answer, with card data and secrets in `message` and `field` masked by `redactor`."""
        field = None if self.field is None else redactor.scrub_text(self.field)
        return json_response(self.status, {"code": self.code, "message": redactor.scrub_text(self.message),
                                           "field": field}, self.headers)


def json_response(status: int, doc: object, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(doc), content_type="application/json", headers=headers)


def from_validation_error(exc: ValidationError) -> ApiError:
    err = exc.errors()[0]
    loc = list(err["loc"])
    if len(loc) > 1 and loc[0] == "payment_method" and loc[1] in ("card", "token"):
        del loc[1]  # the discriminated union's tag is not a field the caller sent
    field = ".".join(str(p) for p in loc) or None
    message = err["msg"].removeprefix("Value error, ")
    return ApiError(422, "invalid_field", message, field)


def error_middleware(log: structlog.typing.FilteringBoundLogger, metrics: Metrics,
                     redactor: Redactor) -> Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]:
    """`redactor`: the app's (it knows the configured secrets), applied to every error answer."""
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as exc:
            return exc.response(redactor)
        except web.HTTPRequestEntityTooLarge:
            return ApiError(413, "body_too_large", "request body is too large").response(redactor)
        except web.HTTPException as exc:
            if exc.status >= 400:
                code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
                return ApiError(exc.status, code, exc.reason).response(redactor)
            raise
        except JournalUnavailable as exc:
            log.warning("journal_unavailable", path=request.path, reason=str(exc))
            return ApiError(503, "journal_unavailable", "the payment journal is unavailable; retry shortly",
                            headers={"Retry-After": JOURNAL_RETRY_AFTER_S}).response(redactor)
        except StoreOverloaded:
            metrics.shed.labels("journal").inc()
            return ApiError(503, "overloaded", "the journal is at capacity; retry shortly",
                            headers={"Retry-After": "1"}).response(redactor)
        except Exception as exc:
            if isinstance(exc, ConnectionResetError) and request.transport is None:
                # The caller hung up (mid-body, typically): nobody is left to answer.
                metrics.client_disconnects.inc()
                return ApiError(400, "client_disconnected", "the client closed the connection").response(redactor)
            log.exception("unhandled_error", path=request.path, error=type(exc).__name__)
            return ApiError(500, "internal_error", "the gateway failed to process this request").response(redactor)

    return middleware


class ProtocolLog:
    """aiohttp's server logger (`handler_args={"logger": ...}`). A request its HTTP parser
    refuses (a malformed request line, header or chunked framing) never reaches a handler:
    aiohttp answers it with a bare-text 400 and logs a traceback each time, so any caller could
    flood the log. Those are counted instead; everything else goes to aiohttp's own logger."""

    def __init__(self, metrics: Metrics, logger: logging.Logger = server_logger) -> None:
        self._metrics = metrics
        self._logger = logger

    def debug(self, *args: Any, **kwargs: Any) -> None:
        self._logger.debug(*args, **kwargs)

    def exception(self, *args: Any, exc_info: object = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            self._metrics.malformed_http.inc()
            return
        self._logger.exception(*args, exc_info=exc_info, **kwargs)  # type: ignore[arg-type]
