"""The server's client errors: `ApiError` (answered as OpenAI's JSON error shape with a
4xx status) and `bad` (a 400 naming the request field)."""

from __future__ import annotations


class ApiError(Exception):
    """A client error: HTTP `status`, OpenAI error `type` and `code`."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status,
            message,
            type_,
            code,
            param,
        )

    def body(self) -> dict:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "code": self.code,
                "param": self.param,
            }
        }


def bad(message: str, param: str | None = None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, "invalid_request_error", code, param)
