"""What every request meets before the endpoints: the API key, the body's
type and size limit (pure ASGI middleware, so an oversized body is never
parsed), and the message of a request that does not fit the pydantic models.

The Authorization scheme is case-insensitive (RFC 7235: `bearer KEY` is
`Bearer KEY`); the key itself is compared in constant time.

Content-Type: a body with no Content-Type is read as JSON (every endpoint
here takes JSON; the Guard adds the header, which FastAPI's strict content
type check otherwise wants, and without it hands pydantic the raw bytes); a body that declares another type (curl
`-d` sends application/x-www-form-urlencoded) is refused with 415 naming the
header and the fix, rather than guessed at: OpenAI's API requires
application/json, and a form or multipart body parsed as JSON would give a
confusing error about the body's fields instead.

Failure modes: 401 (no or wrong key), 413 (body too large), 415 (not JSON),
each in OpenAI's error JSON; a validation message never prints more than a
short excerpt of the offending input, however large it is.
"""

import email.message
import hmac
import json
import reprlib
from typing import Optional

from fastapi.exceptions import RequestValidationError

from .protocol import LIMIT_ERRORS, error_body

_excerpt = reprlib.Repr()
_excerpt.maxlist = _excerpt.maxdict = _excerpt.maxtuple = 4
_excerpt.maxstring = _excerpt.maxother = 80
_excerpt.maxlevel = 3


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
            scheme, _, key = given.strip().partition(" ")
            right = hmac.compare_digest(key.strip().encode("latin-1"), self.api_key.encode("latin-1", "replace"))
            if not (scheme.lower() == "bearer" and right):
                what = "wrong API key" if given else "no API key: send the header 'Authorization: Bearer KEY'"
                return await _send_error(send, 401, f"{what}", code="invalid_api_key")
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared_type = headers.get(b"content-type", b"").decode("latin-1")
        if declared_type and not is_json_type(declared_type):
            return await _send_error(send, 415, f"the Content-Type header says {declared_type[:80]!r}; the body must "
                                     "be JSON: send 'Content-Type: application/json' (curl: -H 'Content-Type: "
                                     "application/json'), or no Content-Type at all")
        if not declared_type:  # FastAPI (strict_content_type) would not parse it: say it is JSON
            scope = {**scope, "headers": [*scope["headers"], (b"content-type", b"application/json")]}
        too_big = f"the request body is larger than {self.max_body} bytes"
        try:
            declared = int(headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        if declared > self.max_body:
            return await _send_error(send, 413, too_big)
        body = bytearray()  # appended in place: += on bytes would copy the body for every chunk
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_body:
                return await _send_error(send, 413, too_big)
            if not message.get("more_body"):
                break
        body = bytes(body)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def is_json_type(content_type: str) -> bool:
    """application/json or application/*+json, with any parameters (as FastAPI decides)."""
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


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
    if e.get("type") in LIMIT_ERRORS:  # the message says what is wrong; the input may be huge
        return f"{param}: {e.get('msg')}" if param else e.get("msg"), param
    return f"{param}: {e.get('msg')} (got {_excerpt.repr(e.get('input'))})" if param else e.get("msg"), param
