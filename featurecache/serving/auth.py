"""The lock on the service's door: a bearer token, and the rule that decides when one is needed.

- Binding to anything but loopback needs a token (`--token T` or FEATURECACHE_TOKEN): a server on
  0.0.0.0 is reachable by every machine on the network, and `/predict` and `/embed` spend its CPU.
  `--no-auth` serves it open anyway, with a warning.
- With a token, every request but OPEN_PATHS must carry `Authorization: Bearer T`; the others get 401
  JSON that says only how to authenticate (the same for a missing and a wrong token, and for paths
  that do not exist, so nothing is learnt about what is behind the door).
- The comparison runs in constant time over SHA-256 digests: hmac.compare_digest on equal-length
  inputs, so neither the token's bytes nor its length leak through response timing.
- Without a token (LoopbackGuard), a loopback server is still reachable by any web page the user opens:
  the page's script may post to 127.0.0.1 (a cross-origin request), or re-point its own name at
  127.0.0.1 (DNS rebinding: the request then carries the page's host name in `Host`). So it answers
  only requests whose Host is a loopback name (localhost, 127.0.0.1, [::1], any port) and whose Origin,
  when a browser sends one, is the server's own; the others get a one-line 403.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from urllib.parse import urlsplit

from starlette.responses import JSONResponse

from ..errors import FeatureCacheError

TOKEN_ENV = "FEATURECACHE_TOKEN"
# What loads without a token: the health check (load balancers), and the page with its static files,
# which asks the person for the token before it calls the API.
OPEN_PATHS = frozenset({"/health", "/", "/favicon.ico"})
OPEN_PREFIXES = ("/static/",)
UNAUTHORIZED = "missing or wrong token; send the header `Authorization: Bearer <token>`"


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable only from this machine ("localhost", 127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface, so it counts as exposed


def token_for(host: str, token: str | None, no_auth: bool, log=None, token_file=None) -> str | None:
    """The token the server will require (None: open), or a one-line refusal to start.

    `token_file` (--token-file) holds it out of sight: every local user can read a --token flag in `ps`."""
    if token_file is not None:
        if token is not None:
            raise FeatureCacheError(f"--token-file and --token (or {TOKEN_ENV}) both give a token; give one of them")
        token = _read_token(token_file)
    if token is not None and not token.strip():
        raise FeatureCacheError(f"--token (or {TOKEN_ENV}) is empty; give a secret, e.g. the output of "
                                "`python -c 'import secrets; print(secrets.token_urlsafe())'`")
    if token is not None and no_auth:
        raise FeatureCacheError("--token and --no-auth contradict each other; give one of them")
    if token is not None:
        return token.strip()
    if no_auth:
        if not is_loopback(host) and log is not None:
            log(f"warning: --no-auth: the service on {host} is open to anyone who can reach the port")
        return None
    if not is_loopback(host):
        raise FeatureCacheError(
            f"--host {host} exposes the service to the network, so it needs a token: pass --token T or set "
            f"{TOKEN_ENV}=T, or --token-file FILE to keep it out of `ps` (clients then send `Authorization: "
            "Bearer T`), or --no-auth to serve it open")
    return None


class LoopbackGuard:
    """ASGI middleware for a server without a token: 403 for a request that names another host in
    `Host` (check_host: the server is bound to loopback) or comes from another web origin."""

    def __init__(self, app, check_host: bool):
        self.app, self.check_host = app, check_host

    def refusal(self, headers) -> str | None:
        host = origin = None
        for name, value in headers:
            if name == b"host":
                host = value.decode("latin-1").strip().lower()
            elif name == b"origin":
                origin = value.decode("latin-1").strip().lower()
        if self.check_host and host is not None and not is_loopback(_hostname(host)):
            return (f"Host {host!r} is not a loopback name; this server has no token, so it answers only "
                    "localhost, 127.0.0.1 or [::1] (start it with --token to serve other names)")
        if origin is not None and (host is None or urlsplit(origin).netloc != host):
            return (f"cross-origin request from {origin!r} refused; this server has no token, so only its "
                    "own page may call it from a browser (start it with --token to allow others)")
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        why = self.refusal(scope["headers"])
        if why is None:
            return await self.app(scope, receive, send)
        return await JSONResponse({"error": why}, status_code=403)(scope, receive, send)


def _hostname(host: str) -> str:
    """The name in a Host header, without its port ("[::1]:8000" -> "::1")."""
    try:
        return urlsplit("//" + host).hostname or ""
    except ValueError:
        return ""


def _read_token(path) -> str:
    try:
        text = open(path, encoding="utf-8").read().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise FeatureCacheError(f"--token-file {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    if not text:
        raise FeatureCacheError(f"--token-file {path}: the file is empty; write a secret in it, e.g. "
                                "`python -c 'import secrets; print(secrets.token_urlsafe())' > FILE`")
    return text


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class TokenAuth:
    """ASGI middleware: 401 for a request without the right bearer token, before the body is read."""

    def __init__(self, app, token: str):
        self.app = app
        self._want = _digest(token.encode())

    def allowed(self, headers) -> bool:
        given = b""
        for name, value in headers:
            if name == b"authorization":  # ASGI lower-cases header names
                given = value
                break
        scheme, _, credentials = given.partition(b" ")
        ok_scheme = scheme.lower() == b"bearer"
        # Always compare, whatever the scheme, so a malformed header costs what a wrong token costs.
        same = hmac.compare_digest(_digest(credentials.strip()), self._want)
        return ok_scheme and same

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES) or self.allowed(scope["headers"]):
            return await self.app(scope, receive, send)
        response = JSONResponse({"error": UNAUTHORIZED}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
        return await response(scope, receive, send)
