"""Errors of the /v1 API in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`, one sentence each.

Clients written for OpenAI's API (its SDKs, evaluation harnesses) read `error.message` and branch on
the HTTP status and `error.code`, so every refusal says what was wrong in one sentence, with the
code an OpenAI client expects where there is one (`invalid_api_key`, `context_length_exceeded`,
`rate_limit_exceeded`, `model_not_found`) and a plain one of ours otherwise. Server paths never
appear: the page's own redaction (`messages.user_message`) is applied to every message.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ...chat.regions import EmptyRegionError
from ...chat.session import ContextTooLongError
from ...errors import BudgetExceededError, ChatEXAONEPathError, ServerBusyError
from ..messages import is_out_of_memory, user_message

logger = logging.getLogger(__name__)

INVALID = "invalid_request_error"


class ApiError(Exception):
    """A request the API refuses: its HTTP status, one sentence, and OpenAI's error type and code."""

    def __init__(self, status: int, message: str, code: str | None = None, *, kind: str = INVALID,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.kind, self.param = status, message, code, kind, param
        self.headers = headers or {}

    def body(self) -> dict:
        """The JSON body OpenAI's clients parse."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad_request(message: str, code: str | None = None, param: str | None = None) -> ApiError:
    """400: the request itself is malformed or outside a limit."""
    return ApiError(400, message, code, param=param)


def not_found(message: str, code: str = "not_found", param: str | None = None) -> ApiError:
    return ApiError(404, message, code, param=param)


def too_many(message: str, code: str = "rate_limit_exceeded", retry_after: float | None = None) -> ApiError:
    """429: a per-key or server-wide limit; `retry_after` seconds go into the Retry-After header."""
    headers = {"Retry-After": str(max(1, round(retry_after)))} if retry_after is not None else None
    return ApiError(429, message, code, kind="rate_limit_error", headers=headers)


def from_exception(error: BaseException, doing: str, uploads: list[Path] = ()) -> ApiError:
    """The API's answer to an exception the engine raised while `doing` something: the page's sentence, our status."""
    if isinstance(error, ApiError):
        return error
    message = user_message(error, doing, uploads)  # logs unexpected errors with their traceback; no server paths
    if isinstance(error, ServerBusyError):
        return too_many(message, "server_busy")
    if isinstance(error, EmptyRegionError):
        return bad_request(message, "invalid_region")
    if isinstance(error, ContextTooLongError):
        return bad_request(message, "context_length_exceeded", "messages")
    if isinstance(error, BudgetExceededError):
        return ApiError(413, message, "too_large")
    if isinstance(error, ChatEXAONEPathError):
        return bad_request(message)
    if is_out_of_memory(error):
        return ApiError(503, message, "out_of_memory", kind="server_error")
    return ApiError(500, message, "internal_error", kind="server_error")
