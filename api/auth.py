"""API keys with scopes: who may call what.

Keys are configured as `NEXTBEST_API_KEYS="name:scope+scope:sha256hex,…"` — only the SHA-256 of each key
is held, so the setting (and a leaked config) does not reveal the keys. A request sends
`Authorization: Bearer <key>`; its hash is compared with every configured hash in constant time.

| scope    | grants                                                          |
| -------- | --------------------------------------------------------------- |
| `decide` | POST /v1/recommendations, POST /v1/offers/next-best             |
| `email`  | GET /v1/email/slots/…, POST /v1/email/slots:batch               |
| `ingest` | POST /v1/events, POST /v1/catalog/items, POST /v1/feedback       |
| `admin`  | PUT/DELETE /v1/customers/…, POST /v1/admin/…, GET /metrics       |

Open without a key: /healthz, /readyz, the OpenAPI docs, and the signed email click links (their
signature is their authorisation). With no keys configured the service is open (the local demo) and
says so at start.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson

log = logging.getLogger("nextbest")
SCOPES = ("decide", "email", "ingest", "admin")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_HASH = re.compile(r"^[0-9a-f]{64}$")
KEY_PREFIX = "nbk_"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


class ApiKeysError(ValueError):
    """The NEXTBEST_API_KEYS setting is malformed."""


@dataclass(frozen=True, slots=True)
class ApiKey:
    name: str
    scopes: frozenset[str]
    digest: bytes  # SHA-256 of the key


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    """A fresh random key (256 bits), recognisable by its prefix in logs and secret scanners."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def parse_keys(value: str | None) -> list[ApiKey]:
    """`name:scope+scope:sha256hex` entries separated by commas or newlines; errors name the entry."""
    keys: list[ApiKey] = []
    for n, raw in enumerate(re.split(r"[,\n]", value or ""), start=1):
        entry = raw.strip()
        if not entry:
            continue
        parts = entry.split(":")
        if len(parts) != 3:
            raise ApiKeysError(f"NEXTBEST_API_KEYS entry {n}: expected 'name:scope+scope:sha256hex'")
        name, scopes, digest = parts
        if not _NAME.match(name):
            raise ApiKeysError(f"NEXTBEST_API_KEYS entry {n}: bad name {name!r} (letters, digits, '_', '.', '-')")
        wanted = frozenset(s.strip() for s in scopes.split("+") if s.strip())
        unknown = wanted - set(SCOPES)
        if not wanted or unknown:
            raise ApiKeysError(
                f"NEXTBEST_API_KEYS entry {n} ({name}): unknown scope(s) {sorted(unknown) or '(none given)'}; "
                f"known: {', '.join(SCOPES)}"
            )
        if not _HASH.match(digest):
            raise ApiKeysError(
                f"NEXTBEST_API_KEYS entry {n} ({name}): the third part must be the key's SHA-256 in hex "
                "(64 characters; `nextbest keys new` prints it) — never the key itself"
            )
        if any(k.name == name for k in keys):
            raise ApiKeysError(f"NEXTBEST_API_KEYS: the name {name!r} is used twice")
        keys.append(ApiKey(name, wanted, bytes.fromhex(digest)))
    return keys


def required_scope(method: str, path: str) -> str | None:
    """The scope a request needs; None for what is open to everyone."""
    if path in ("/healthz", "/readyz", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        return None
    if path.startswith("/v1/email/click/"):
        return None  # the link's signature authorises it
    if path in ("/v1/recommendations", "/v1/offers/next-best"):
        return "decide"
    if path.startswith("/v1/email/"):
        return "email"
    if path in ("/v1/events", "/v1/catalog/items", "/v1/feedback"):
        return "ingest"
    return "admin"  # customers, admin, metrics, and anything not listed: the narrowest audience


class ApiKeyAuth:
    """ASGI middleware: 401 without a valid key, 403 without the scope, nothing else touched."""

    def __init__(self, app: App, keys: list[ApiKey]) -> None:
        self.app = app
        self.keys = keys

    def identify(self, header: bytes | None) -> ApiKey | None:
        if not header or header[:7].lower() != b"bearer ":
            return None
        digest = hashlib.sha256(header[7:].strip()).digest()
        found = None
        for key in self.keys:  # every key is compared: the time does not depend on which one matches
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        needed = required_scope(scope["method"], scope["path"])
        if needed is None:
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        key = self.identify(header)
        if key is None:
            why = "missing API key" if header is None else "invalid API key"
            await _reply(send, 401, f"{why}: send 'Authorization: Bearer <key>' with a key that has scope '{needed}'")
            return
        if needed not in key.scopes:
            msg = f"API key '{key.name}' lacks scope '{needed}' needed for {scope['method']} {scope['path']}"
            await _reply(send, 403, msg)
            return
        await self.app(scope, receive, send)


def document_security(schema: dict[str, Any]) -> dict[str, Any]:
    """Add the bearer scheme, and the 401/403 answers, to every operation of an OpenAPI document that needs a key."""
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})["apiKey"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "an API key with the operation's scope: " + ", ".join(SCOPES),
    }
    detail = {"type": "object", "properties": {"detail": {"type": "string"}}, "required": ["detail"]}
    for path, operations in schema.get("paths", {}).items():
        for method, op in operations.items():
            scope = required_scope(method.upper(), path)
            if scope is None or not isinstance(op, dict) or "security" in op:
                continue  # open, or already documented (the document is built once and cached)
            op["security"] = [{"apiKey": []}]
            op["description"] = (op.get("description", "") + f"\n\nNeeds an API key with scope `{scope}`.").strip()
            responses = op.setdefault("responses", {})
            for status, what in (("401", "no API key, or an unknown one"), ("403", f"the key lacks scope '{scope}'")):
                responses.setdefault(status, {"description": what, "content": {"application/json": {"schema": detail}}})
    return schema


async def _reply(send: Send, status: int, detail: str) -> None:
    body = orjson.dumps({"detail": detail})
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="nextbest"'))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
