"""Errors a request can earn, in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from typing import Any


class RequestError(Exception):
    """A bad request (4xx) or a server-side failure (5xx); `body()` is what the client receives."""

    def __init__(
        self, status: int, message: str, *, type: str | None = None, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, **self.body()}

    def __reduce__(self):  # picklable (Ray ships it between processes): Exception's default would lose the status
        return RequestError.from_dict, (self.to_dict(),)

    @classmethod
    def from_dict(cls, d: dict) -> RequestError:
        e = d["error"]
        return cls(d.get("status", 500), e["message"], type=e.get("type"), param=e.get("param"), code=e.get("code"))


def bad_request(message: str, param: str | None = None, code: str | None = None) -> RequestError:
    return RequestError(400, message, param=param, code=code)


def not_found(message: str, param: str | None = "model", code: str = "model_not_found") -> RequestError:
    return RequestError(404, message, param=param, code=code)
