"""What every request meets before the endpoints: the API key, the body size
limit (pure ASGI middleware, so an oversized body is never parsed), and the
message of a request that does not fit the pydantic models."""

import hmac
import json
from typing import Optional

from fastapi.exceptions import RequestValidationError

from .protocol import error_body


class Guard:
    """ASGI middleware: the API key (every path but /health) and the body size limit."""

    def __init__(self, app, api_key: Optional[str], max_body: int):
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.api_key and scope["path"] != "/health":
            given = headers.get(b"authorization", b"").decode("latin-1")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                what = "wrong API key" if given else "no API key: send the header 'Authorization: Bearer KEY'"
                return await _send_error(send, 401, f"{what}", code="invalid_api_key")
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_big = f"the request body is larger than {self.max_body} bytes"
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > self.max_body:
            return await _send_error(send, 413, too_big)
        body = b""
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body:
                return await _send_error(send, 413, too_big)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


async def _send_error(send, status: int, message: str, code: Optional[str] = None):
    payload = json.dumps(error_body(status, message, code=code)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})


def validation_message(exc: RequestValidationError):
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    e = errors[0]
    loc = [str(p) for p in e.get("loc", ()) if p != "body"]
    if e.get("type") == "json_invalid":
        return f"the body is not valid JSON: {e.get('ctx', {}).get('error', e.get('msg'))}", None
    param = ".".join(loc) or None
    if e.get("type") == "extra_forbidden":
        return f"unrecognized request argument supplied: {param}", param
    if e.get("type") == "missing":
        return f"missing required parameter: {param}", param
    return f"{param}: {e.get('msg')} (got {str(e.get('input'))[:80]!r})" if param else e.get("msg"), param
