"""HTTP/1.1 wire format for the load generator: encoding requests to bytes (refusing what could split or
smuggle one) and incrementally parsing the server's responses."""

from __future__ import annotations

from typing import Final, Protocol

__all__ = ["ProtocolError", "RequestLike", "ResponseParser", "encode_request", "host_header"]

# A response head larger than this is not something our server sends; refuse it rather than buffer forever.
_MAX_HEAD_BYTES: Final = 64 * 1024


class RequestLike(Protocol):
    """What encoding needs of a request. benchmarks.loadgen.Request is one; a protocol rather than an import so
    this module does not depend back on the module that uses it."""

    @property
    def method(self) -> str: ...
    @property
    def path(self) -> str: ...
    @property
    def body(self) -> bytes: ...
    @property
    def headers(self) -> tuple[tuple[str, str], ...]: ...


def host_header(host: str, port: int) -> str:
    """The Host header value for host:port (IPv6 literals bracketed)."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def encode_request(request: RequestLike, host: str) -> tuple[bytes, bool]:
    """The request's bytes with `host` as its Host header, and whether it is a HEAD request (its response
    has no body)."""
    method = request.method.upper()
    # The bytes go on the wire verbatim: refuse what would split or smuggle a request.
    if not method.isalpha() or not request.path.startswith("/") or any(c.isspace() for c in request.path):
        raise ValueError(f"malformed request line in {request!r}: method letters only, path from '/', no spaces")
    if any("\r" in part or "\n" in part for header in request.headers for part in header):
        raise ValueError(f"line break in a header of {request!r}")
    names = {name.lower() for name, _ in request.headers}
    if names & {"content-length", "transfer-encoding", "host"}:
        raise ValueError(f"{request!r}: Content-Length, Transfer-Encoding and Host are set by the generator")
    lines = [f"{method} {request.path} HTTP/1.1", f"Host: {host}"]
    if "user-agent" not in names:
        lines.append("User-Agent: nextbest-loadgen")
    if request.body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(request.body)}")
        if request.body and "content-type" not in names:
            lines.append("Content-Type: application/json")
    lines.extend(f"{name}: {value}" for name, value in request.headers)
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + request.body, method == "HEAD"


class ProtocolError(Exception):
    """The server's bytes are not a well-formed HTTP/1.1 response."""


_IDLE, _HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _UNTIL_CLOSE = range(8)


class ResponseParser:
    """Incremental HTTP/1.1 response parser for one request at a time (the client never pipelines).

    feed() returns the status code once the whole response, body included, has arrived, else 0.
    """

    __slots__ = ("_buf", "_head_request", "_remaining", "_state", "_status", "keep_alive")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._state = _IDLE
        self._remaining = 0
        self._status = 0
        self._head_request = False
        self.keep_alive = True

    def start(self, *, head_request: bool = False) -> None:
        """Expect the response to a newly sent request."""
        self._state = _HEAD
        self._head_request = head_request
        self._status = 0
        self.keep_alive = True

    def feed(self, data: bytes) -> int:
        if self._state == _IDLE:
            raise ProtocolError("data received while no request was outstanding")
        buf = self._buf
        buf += data
        while True:
            state = self._state
            if state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > _MAX_HEAD_BYTES:
                        raise ProtocolError("response head too large")
                    return 0
                head = bytes(buf[:end])
                del buf[: end + 4]
                if self._parse_head(head):
                    return self._finish()
            elif state == _BODY:
                if len(buf) >= self._remaining:
                    del buf[: self._remaining]
                    return self._finish()
                self._remaining -= len(buf)
                buf.clear()
                return 0
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > 1024:
                        raise ProtocolError("chunk size line too long")
                    return 0
                line = bytes(buf[:end]).split(b";", 1)[0].strip()
                del buf[: end + 2]
                try:
                    size = int(line, 16)
                except ValueError:
                    raise ProtocolError(f"bad chunk size {line!r}") from None
                if size < 0:
                    raise ProtocolError(f"bad chunk size {line!r}")
                self._state, self._remaining = (_TRAILER, 0) if size == 0 else (_CHUNK_DATA, size)
            elif state == _CHUNK_DATA:
                if len(buf) < self._remaining:
                    self._remaining -= len(buf)
                    buf.clear()
                    return 0
                del buf[: self._remaining]
                self._state = _CHUNK_END
            elif state == _CHUNK_END:
                if len(buf) < 2:
                    return 0
                if buf[:2] != b"\r\n":
                    raise ProtocolError("chunk data not followed by CRLF")
                del buf[:2]
                self._state = _CHUNK_SIZE
            elif state == _TRAILER:
                end = buf.find(b"\r\n")
                if end < 0:
                    if len(buf) > _MAX_HEAD_BYTES:
                        raise ProtocolError("trailer too large")
                    return 0
                del buf[: end + 2]
                if end == 0:
                    return self._finish()
            else:  # _UNTIL_CLOSE: the body ends when the server closes the connection
                buf.clear()
                return 0

    def eof(self) -> int:
        """The server closed the connection: the status if that completed a close-delimited body, else 0."""
        if self._state == _UNTIL_CLOSE:
            self._state = _IDLE
            return self._status
        return 0

    def _parse_head(self, head: bytes) -> bool:
        """Set up body parsing from the head; True if the response has no body (it is complete)."""
        lines = head.split(b"\r\n")
        status_line = lines[0]
        if not status_line.startswith(b"HTTP/1.") or len(status_line) < 12:
            raise ProtocolError(f"bad status line {status_line[:80]!r}")
        try:
            status = int(status_line[9:12])
        except ValueError:
            raise ProtocolError(f"bad status line {status_line[:80]!r}") from None
        keep_alive = status_line[7:8] == b"1"  # HTTP/1.1 defaults to keep-alive, 1.0 to close
        length: int | None = None
        chunked = False
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise ProtocolError(f"bad header line {line[:80]!r}")
            name = name.strip().lower()
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise ProtocolError(f"bad Content-Length {value!r}") from None
                if length < 0:
                    raise ProtocolError(f"bad Content-Length {value!r}")
            elif name == b"transfer-encoding":
                chunked = value.strip().lower().endswith(b"chunked")
            elif name == b"connection":
                tokens = {token.strip() for token in value.lower().split(b",")}
                if b"close" in tokens:
                    keep_alive = False
                elif b"keep-alive" in tokens:
                    keep_alive = True
        if 100 <= status < 200:
            if status == 101:
                raise ProtocolError("unexpected protocol upgrade")
            return False  # interim response: the real one follows, stay in _HEAD
        self._status = status
        self.keep_alive = keep_alive
        if self._head_request or status in (204, 304):
            return True
        if chunked:  # takes precedence over Content-Length (RFC 9112 §6.3)
            self._state = _CHUNK_SIZE
        elif length is not None:
            if length == 0:
                return True
            self._state, self._remaining = _BODY, length
        else:
            self._state = _UNTIL_CLOSE
            self.keep_alive = False
        return False

    def _finish(self) -> int:
        self._state = _IDLE
        if self._buf:
            raise ProtocolError(f"{len(self._buf)} unexpected bytes after the response")
        return self._status
