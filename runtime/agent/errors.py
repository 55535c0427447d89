"""Errors of the agent's HTTP API, always in OpenAI's shape, and the middleware that enforces it.

This module owns how every failure reaches a client: ``{"error": {"message", "type", "param",
"code"}}`` with the right status. Handlers raise :class:`APIError`; aiohttp's own HTTP exceptions
(unknown route, wrong method, body too large) are rewritten into the same shape; anything else is
logged server-side with its traceback and becomes a 500 that reveals nothing about the internals.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Middleware
from pydantic import ValidationError

__all__ = [
    "APIError",
    "error_body",
    "error_middleware",
    "param_from_validation_error",
]

log = logging.getLogger("fleetform.agent")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Rejection reasons recorded by metrics, keyed by the status they come with when not given.
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "overloaded_error",
}


class APIError(Exception):
    """An error response: status, message, and the OpenAI ``type``/``param``/``code`` fields.

    ``reason`` is the label it is counted under in ``fleetform_rejected_requests_total``.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        retry_after: int | None = None,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.error_type = error_type or _TYPE_BY_STATUS.get(status, "invalid_request_error")
        self.retry_after = retry_after
        self.reason = reason

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.error_type, self.param, self.code)

    def response(self) -> web.Response:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else None
        return web.json_response(self.body(), status=self.status, headers=headers)


def error_body(
    message: str, error_type: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


def param_from_validation_error(
    error: ValidationError, data: Any
) -> tuple[str | None, str, str | None]:
    """``(param, message, code)`` for the most specific problem pydantic found in ``data``.

    pydantic's locations include names of union members (``('stop', 'list[str]', 0)``); those are
    dropped by following the location through the submitted data, so the client sees
    ``stop[0]``, the path of what it sent. A union reports one error per member; the one that
    reaches deepest into the data is the member the client meant (a list given for ``stop``
    fails as a list of strings, not as a string).
    """
    best: tuple[int, str | None, Any] | None = None
    for item in error.errors(include_url=False):
        depth, param = _data_path(item["loc"], data, missing=item["type"] == "missing")
        if best is None or depth > best[0]:
            best = (depth, param, item)
    assert best is not None
    _, param, first = best
    if first["type"] == "extra_forbidden":
        return param, f"Unrecognized request argument supplied: {param}", "unknown_parameter"
    message = first["msg"].removeprefix("Value error, ")
    return param, f"{param}: {message}" if param else message, "invalid_value"


def _data_path(location: tuple[Any, ...], data: Any, missing: bool) -> tuple[int, str | None]:
    current: Any = data
    parts: list[str] = []
    for index, element in enumerate(location):
        if isinstance(current, Mapping) and isinstance(element, str) and element in current:
            parts.append(f".{element}" if parts else element)
            current = current[element]
        elif isinstance(current, list) and isinstance(element, int) and element < len(current):
            parts.append(f"[{element}]")
            current = current[element]
        elif (
            missing
            and index == len(location) - 1
            and isinstance(element, str)
            and isinstance(current, Mapping)
        ):
            parts.append(f".{element}" if parts else element)
        # anything else is a union-member tag: skip it
    return len(parts), "".join(parts) or None


def _from_http_exception(exc: web.HTTPException) -> web.Response:
    status = exc.status
    if status == 404:
        message, code = "Unknown route", "not_found"
    elif status == 405:
        message, code = f"Method not allowed; use {exc.headers.get('Allow', 'another')}", None
    elif status == 413:
        message, code = "Request body too large", "request_too_large"
    else:
        message, code = exc.reason, None
    headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}
    return web.json_response(
        error_body(message, _TYPE_BY_STATUS.get(status, "invalid_request_error"), None, code),
        status=status,
        headers=headers or None,
    )


def make_error_middleware(on_rejected: Callable[[str], None] | None = None) -> Middleware:
    """The middleware; ``on_rejected(reason)`` is told about each error response's reason."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except APIError as error:
            if on_rejected is not None and error.reason is not None:
                on_rejected(error.reason)
            return error.response()
        except web.HTTPException as exc:
            if exc.status < 400:
                raise  # redirects and the like pass through
            if on_rejected is not None and exc.status in (413, 400):
                on_rejected("bad_request")
            return _from_http_exception(exc)
        except ConnectionResetError:
            raise  # the client went away; aiohttp handles it
        except Exception:
            # Never show internals to the client; the traceback stays in the server log.
            log.exception("unhandled error in %s %s", request.method, request.path)
            if on_rejected is not None:
                on_rejected("internal_error")
            return web.json_response(
                error_body("Internal server error", "server_error", None, "internal_error"),
                status=500,
            )

    return middleware


error_middleware = make_error_middleware()
