"""The one error tree of llmux.

Every failure a client can see is an ``LlmuxError``, whether llmux answers it or one of the
built-in engines' own servers does (those marked ``engine``, ``engine_only``). Each class fixes
the HTTP status, the OpenAI error ``type`` and ``code`` (``null`` where none is shown). The
boundary, ``llmux.api.errors``, is the one place that turns any of them, and any unexpected
exception (as ``InternalError``), into OpenAI's envelope
``{"error": {"message", "type", "param", "code"}}``. Nothing branches on message text. The tree
lists exactly the classes there are (``tests/test_errors.py`` parses it)::

    LlmuxError                  500 server_error
    ├── InvalidRequest          400 invalid_request_error / invalid_request
    │   ├── UnsupportedModel    400 invalid_request_error / unsupported_model (wrong type)
    │   ├── InvalidAudio        400 invalid_request_error / invalid_audio (engine; also Wyoming)
    │   ├── InputTooLong        400 invalid_request_error / string_above_max_length (engine)
    │   ├── RequestTimeout      408 invalid_request_error / request_timeout (slow client)
    │   ├── BodyTooLarge        413 invalid_request_error / body_too_large
    │   └── HeadersTooLarge     431 invalid_request_error / headers_too_large
    ├── AuthenticationFailed    401 authentication_error / invalid_api_key
    ├── PermissionDenied        403 permission_error / permission_error
    ├── NotFound                404 invalid_request_error / not_found (no such route)
    ├── ModelNotFound           404 invalid_request_error / model_not_found
    ├── MethodNotAllowed        405 invalid_request_error / method_not_allowed
    ├── CannotSleep             409 invalid_request_error / cannot_sleep (admin sleep)
    ├── QueueFull               429 rate_limit_error / queue_full
    ├── RequestCancelled        499 invalid_request_error / request_cancelled (engine)
    ├── InternalError           500 server_error (engine: an unexpected exception)
    ├── UpstreamError           502 upstream_error / upstream_error
    ├── InsufficientVram        503 insufficient_vram / insufficient_vram
    ├── ModelLoadFailed         503 model_load_failed / model_load_failed
    ├── ModelUnavailable        503 service_unavailable / model_unavailable (shutting down, removed)
    ├── ServerBusy              503 service_unavailable / server_busy (connection cap)
    └── QueueTimeout            504 timeout_error / queue_timeout

Internal errors are separate (plain exceptions, not ``LlmuxError``): no client ever sees one as
such. Each stops something or becomes one of the errors above where it meets a request::

    ConfigError             invalid configuration: stops ``llmux serve``; ``check-config`` prints it
    EngineError             a built-in engine cannot be set up (unknown engine, model or option, a
                            missing package): a configuration problem, or a failed load
                            (``ModelLoadFailed``) with its message; ``InvalidArgs``
                            (``llmux.engines.args``) is one for ``args``, key by key
    LaunchFailed            a child could not be started or never became ready: a failed load
                            (``ModelLoadFailed``) with the child's last output lines
    IllegalTransition       a lifecycle move outside the legal-transition table: a bug in llmux
"""

from __future__ import annotations

from typing import ClassVar


class LlmuxError(Exception):
    """Base of every client-visible error."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None
    engine_only: ClassVar[bool] = False
    """Answered only by the built-in engines' servers, never by llmux itself."""

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequest(LlmuxError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class UnsupportedModel(InvalidRequest):
    """The model exists but is of a type the route does not serve (a TTS model on chat)."""

    code = "unsupported_model"


class InvalidAudio(InvalidRequest):
    """The upload could not be decoded as audio (faster-whisper engine)."""

    code = "invalid_audio"
    engine_only = True


class InputTooLong(InvalidRequest):
    """``input`` is longer than the engine accepts (piper engine; OpenAI's code for it)."""

    code = "string_above_max_length"
    engine_only = True


class RequestTimeout(InvalidRequest):
    status = 408
    code = "request_timeout"


class BodyTooLarge(InvalidRequest):
    status = 413
    code = "body_too_large"


class HeadersTooLarge(InvalidRequest):
    status = 431
    code = "headers_too_large"


class AuthenticationFailed(LlmuxError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(LlmuxError):
    status = 403
    type = "permission_error"
    code = "permission_error"


class NotFound(LlmuxError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(LlmuxError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class ModelNotFound(LlmuxError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"

    def __init__(self, model: str) -> None:
        super().__init__(f"The model '{model}' does not exist.", param="model")
        self.model = model


class CannotSleep(LlmuxError):
    """An admin sleep of a model that has no ``sleep:``, is not loaded, or stopped instead."""

    status = 409
    type = "invalid_request_error"
    code = "cannot_sleep"


class QueueFull(LlmuxError):
    status = 429
    type = "rate_limit_error"
    code = "queue_full"


class RequestCancelled(LlmuxError):
    """An engine stopped a request (cancelled, or its client left) before its answer started.

    499 is nginx's "client closed request"."""

    status = 499
    type = "invalid_request_error"
    code = "request_cancelled"
    engine_only = True


class InternalError(LlmuxError):
    """An unexpected exception in an engine's server, answered without a traceback."""

    status = 500
    type = "server_error"
    engine_only = True


class UpstreamError(LlmuxError):
    status = 502
    type = "upstream_error"
    code = "upstream_error"


class InsufficientVram(LlmuxError):
    status = 503
    type = "insufficient_vram"
    code = "insufficient_vram"


class ModelLoadFailed(LlmuxError):
    status = 503
    type = "model_load_failed"
    code = "model_load_failed"


class ModelUnavailable(LlmuxError):
    status = 503
    type = "service_unavailable"
    code = "model_unavailable"


class ServerBusy(LlmuxError):
    status = 503
    type = "service_unavailable"
    code = "server_busy"


class QueueTimeout(LlmuxError):
    status = 504
    type = "timeout_error"
    code = "queue_timeout"


class ConfigError(Exception):
    """An invalid configuration. ``problems`` holds one line per error, each naming the key."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: " + "; ".join(problems))


class EngineError(Exception):
    """A built-in engine cannot be set up: unknown engine, model or option, or a missing package.

    Raised while building a child's command line, before anything is started, so it surfaces as a
    configuration problem (``llmux check-config``) or a failed load with this message.
    """


class LaunchFailed(Exception):
    """The child could not be started or never became ready. Its process group is gone."""

    def __init__(self, message: str, log_tail: list[str]) -> None:
        super().__init__(message)
        self.message = message
        self.log_tail = log_tail

    def describe(self) -> str:
        tail = "\n".join(self.log_tail[-20:])
        return f"{self.message}\n--- last output ---\n{tail}" if tail else self.message


class IllegalTransition(RuntimeError):
    """A lifecycle move that the legal-transition table forbids (``ModelRecord.move``): a bug."""
