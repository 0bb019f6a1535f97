"""The one error type of the server: what a client did wrong, as an OpenAI-style JSON error."""

from __future__ import annotations

from typing import Any


class RequestError(Exception):
    """A client error: HTTP `status`, one-line `message`, the offending `param` and an OpenAI `code`."""

    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.kind = kind

    def body(self) -> dict[str, Any]:
        """OpenAI's error envelope: `{"error": {"message", "type", "param", "code"}}`."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
