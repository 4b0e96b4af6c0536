"""The lock on the service's door: a bearer token, and the rule that decides when one is needed.

- Binding to anything but loopback needs a token (`--token T` or FEATURECACHE_TOKEN): a server on
  0.0.0.0 is reachable by every machine on the network, and `/predict` and `/embed` spend its CPU.
  `--no-auth` serves it open anyway, with a warning.
- With a token, every request but OPEN_PATHS must carry `Authorization: Bearer T`; the others get 401
  JSON that says only how to authenticate (the same for a missing and a wrong token, and for paths
  that do not exist, so nothing is learnt about what is behind the door).
- The comparison runs in constant time over SHA-256 digests: hmac.compare_digest on equal-length
  inputs, so neither the token's bytes nor its length leak through response timing.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress

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


def token_for(host: str, token: str | None, no_auth: bool, log=None) -> str | None:
    """The token the server will require (None: open), or a one-line refusal to start."""
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
            f"{TOKEN_ENV}=T (clients then send `Authorization: Bearer T`), or --no-auth to serve it open")
    return None


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
