"""Who may call System Operations: every route under `/pypnm/system/`, and `/metrics` (SYSTEM_PATHS).

The rules, checked in this order for each request to them (`/health`, the
docs and `/openapi.json` are not affected):

1. Cross-site requests are refused with 403, whatever the address or token. A request
   is cross-site when its `Origin` header is neither the service itself (scheme and
   `Host` of the request) nor an origin listed in `cors_origins` (a `*` there does not
   count), or when a browser marks it with `Sec-Fetch-Site` other than `same-origin` or
   `none` (that is `cross-site` or `same-site`) and its `Origin` is not listed in
   `cors_origins`. Browsers send no `Origin` on a no-cors GET such as `<img src>`, so
   `Sec-Fetch-Site` is what catches those. Clients that send neither header (curl,
   scripts, `pypnm reload`) are not affected.
2. A request with an `Authorization` header must carry `Bearer <token>` with one of
   the configured tokens (`api_tokens`, `api_tokens_file`); otherwise it gets 401 with
   `WWW-Authenticate: Bearer`, even from a trusted address, so that a stale token is
   reported rather than silently ignored. Tokens are read once, when the app is built,
   and kept only as SHA-256 digests; the digest of the presented token is compared
   with each of them with `hmac.compare_digest` (same length, constant time, no early
   exit).
3. Without an `Authorization` header, the client address must be in
   `trusted_networks` (default loopback only); otherwise 403. Such a request, admitted
   by its address, must also carry one `Host` header that names this service, with any
   port: `localhost`, a loopback address (127.x, `[::1]`), the address the connection
   came in on (`scope["server"]`) or the `host` setting (unless it is a wildcard such
   as 0.0.0.0), or a name in `allowed_hosts` (`*.example.net` matches any name under
   example.net). Otherwise 403, as for a missing, repeated or malformed `Host`. This
   closes DNS rebinding: a page whose host name an attacker re-points at 127.0.0.1 is
   same-origin with the service as far as the browser knows, so rule 1 lets it through,
   but its requests carry the attacker's name in `Host`. A token-bearing request is not
   checked: a rebinding page has no token.

The client address is the TCP peer (`scope["client"]`; the workers run uvicorn with
`proxy_headers=False`). Only when the peer is in `forwarded_allow_ips` (default: none)
is `X-Forwarded-For` used: its entries are read from the right and the first one that
is not itself in `forwarded_allow_ips` is the client, because entries to the left of
the last proxy we trust were written by whoever sent the request and can be forged.
If every entry is an allowed proxy the left-most one is the client; an entry that is
not an IP address makes the client unknown (never trusted by address). From such a
peer `X-Forwarded-Proto` also decides the scheme used to recognise the service's own
`Origin`. The proxy must pass the original `Host` header (the name the browser used),
which both the `Origin` rule and the `Host` rule read; `X-Forwarded-Host` is never read.
Behind a proxy the public name therefore goes in `allowed_hosts`. A proxy that sends
its own upstream address as `Host` instead makes every proxied request look addressed
to loopback, and the `Host` rule then protects nothing behind it.

Every request to them writes one audit line to the `pypnm.audit` logger:
time, client, peer, Host, token label (never the token), request id, method, route,
status and outcome; the values a client controls go through `log_field`. Secrets never
reach a log line or a response.

Why a pure ASGI middleware rather than a dependency on the System Operations router:
the audit line needs the status actually sent (including the route's own 500 and
the 404/405 of paths and methods that no route serves), which only code wrapping
`send` sees; it guards the whole prefix, including routes that later land in another
router, before any routing or route code runs; and refused requests cost no
dependency resolution. It sits inside the CORS middleware, so that CORS preflights
are answered by CORS and CORS headers are added to the 401/403 answers a permitted
origin gets, and inside the request-log middleware, whose request id it logs.
`document_access` adds the same rules to the OpenAPI document (bearer scheme, 401
and 403 answers), so that `/docs` offers an "Authorize" button.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from pypnm.api.middleware import StatusRecorder, request_id_of
from pypnm.identity import utc_now
from pypnm.logs import log_field
from pypnm.settings import IPNetwork, Settings, canonical_host, is_host_name

audit_logger = logging.getLogger("pypnm.audit")

SYSTEM_PREFIX = "/pypnm/system"
# System Operations outside the prefix, under the same rules: the metrics tell how the service runs.
SYSTEM_PATHS = frozenset({"/metrics"})
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

HOW_TO_GET_A_TOKEN = (
    "send 'Authorization: Bearer <token>' with a token configured in api_tokens or api_tokens_file "
    "(PYPNM_API_TOKENS, PYPNM_API_TOKENS_FILE)"
)
UNTRUSTED_DETAIL = (
    "System Operations are open only to clients in trusted_networks (PYPNM_TRUSTED_NETWORKS) "
    "and to callers with a bearer token: " + HOW_TO_GET_A_TOKEN + "; this request came from {client}"
)
BAD_TOKEN_DETAIL = (
    "Invalid bearer token: " + HOW_TO_GET_A_TOKEN + ", or call from a network in trusted_networks "
    "(PYPNM_TRUSTED_NETWORKS) without an Authorization header"
)
MALFORMED_TOKEN_DETAIL = "Malformed Authorization header: expected a single 'Bearer <token>'; " + HOW_TO_GET_A_TOKEN
UNKNOWN_HOST_DETAIL = (
    "{what}: a request admitted by its address (trusted_networks, no token) must be addressed to this service "
    "by localhost, a loopback address, the address the service listens on, or a name listed in allowed_hosts "
    "(PYPNM_ALLOWED_HOSTS), as a guard against DNS rebinding; add the name to allowed_hosts, or " + HOW_TO_GET_A_TOKEN
)
CROSS_SITE_DETAIL = (
    "Cross-site request refused: System Operations accept browser requests only from the service's own "
    "pages or from an origin listed in cors_origins (PYPNM_CORS_ORIGINS); call them with curl or "
    "'pypnm reload' instead"
)

_DEFAULT_PORTS = {"http": 80, "https": 443}
_SAFE_SITES = frozenset({"same-origin", "none"})
_HOST_HEADER = re.compile(r"(?P<host>\[[^\]]*\]|[^:\[\]]*)(?::\d{0,5})?")


@dataclass(frozen=True)
class Decision:
    """What the guard decided for one request, and what the audit line says about it."""

    allowed: bool
    outcome: str  # "allowed:trusted-network", "allowed:token", "denied:<why>"
    client: str
    peer: str
    host: str  # the Host header(s) as received, for the audit line
    token_label: str | None = None
    status: int = 200
    detail: str = ""


@dataclass(frozen=True)
class AccessPolicy:
    """The access settings, parsed once when the app is built."""

    trusted_networks: tuple[IPNetwork, ...]
    forwarded_allow_ips: tuple[IPNetwork, ...]
    allowed_origins: frozenset[str]
    token_digests: tuple[tuple[str, bytes], ...]  # (label, SHA-256 of the token)
    own_hosts: frozenset[str] = frozenset()  # canonical hosts (see canonical_host) that name the service
    own_domains: tuple[str, ...] = ()  # ".example.net" for each "*.example.net" in allowed_hosts

    @classmethod
    def from_settings(cls, settings: Settings) -> AccessPolicy:
        """Raises SettingsError when `api_tokens_file` cannot be read or parsed."""
        origins = (normalize_origin(origin) for origin in settings.cors_origins if origin != "*")
        own_hosts = {"localhost", *(host for host in settings.allowed_hosts if not host.startswith("*."))}
        bound = canonical_host(settings.host)
        if bound is not None and (is_host_name(bound) or not ipaddress.ip_address(bound).is_unspecified):
            own_hosts.add(bound)  # the host setting, unless it is a wildcard such as 0.0.0.0
        return cls(
            trusted_networks=tuple(settings.trusted_networks),
            forwarded_allow_ips=tuple(settings.forwarded_allow_ips),
            allowed_origins=frozenset(origin for origin in origins if origin is not None),
            token_digests=tuple(
                (label, hashlib.sha256(token.encode("utf-8")).digest()) for label, token in settings.tokens().items()
            ),
            own_hosts=frozenset(own_hosts),
            own_domains=tuple(host[1:] for host in settings.allowed_hosts if host.startswith("*.")),
        )

    # ----- the client's address ---------------------------------------------------------------

    def is_proxy(self, address: IPAddress | None) -> bool:
        return address is not None and any(address in network for network in self.forwarded_allow_ips)

    def is_trusted(self, address: IPAddress | None) -> bool:
        return address is not None and any(address in network for network in self.trusted_networks)

    def client_address(self, peer: IPAddress | None, forwarded_for: list[str]) -> IPAddress | None:
        """The client: the peer, or from an allowed proxy the right-most X-Forwarded-For entry not a proxy."""
        if not forwarded_for or not self.is_proxy(peer):
            return peer
        entries = [entry.strip() for value in forwarded_for for entry in value.split(",")]
        client = peer
        for entry in reversed([entry for entry in entries if entry]):
            client = parse_forwarded_entry(entry)
            if not self.is_proxy(client):
                break
        return client

    # ----- the decision -----------------------------------------------------------------------

    def decide(self, scope: Scope) -> Decision:
        headers = _headers(scope)
        peer_text = scope["client"][0] if scope.get("client") else None
        peer = parse_ip(peer_text)
        client = self.client_address(peer, headers.get("x-forwarded-for", []))
        shown_client = str(client) if client is not None else "unknown"
        shown_peer = str(peer) if peer is not None else str(peer_text or "unknown")
        hosts = headers.get("host", [])
        shown_host = ", ".join(hosts) if hosts else "-"

        def deny(outcome: str, status: int, detail: str) -> Decision:
            return Decision(False, outcome, shown_client, shown_peer, shown_host, status=status, detail=detail)

        if self._is_cross_site(scope, headers, from_proxy=self.is_proxy(peer)):
            return deny("denied:cross-site", 403, CROSS_SITE_DETAIL)
        authorization = headers.get("authorization", [])
        if authorization:
            token = _bearer_token(authorization)
            if token is None:
                return deny("denied:malformed-token", 401, MALFORMED_TOKEN_DETAIL)
            label = self.token_label(token)
            if label is None:
                return deny("denied:bad-token", 401, BAD_TOKEN_DETAIL)
            return Decision(True, "allowed:token", shown_client, shown_peer, shown_host, token_label=label)
        if not self.is_trusted(client):
            where = shown_client if client is not None else "an address that could not be determined"
            return deny("denied:untrusted-client", 403, UNTRUSTED_DETAIL.format(client=where))
        if len(hosts) != 1 or not self.names_this_service(hosts[0], scope):
            return deny("denied:unknown-host", 403, UNKNOWN_HOST_DETAIL.format(what=_describe_hosts(hosts)))
        return Decision(True, "allowed:trusted-network", shown_client, shown_peer, shown_host)

    def names_this_service(self, host_header: str, scope: Scope) -> bool:
        """Whether a `Host` header value (any port) is loopback, the server's own address or an allowed host."""
        match = _HOST_HEADER.fullmatch(host_header.strip())
        host = canonical_host(match["host"]) if match is not None else None
        if host is None:
            return False
        if is_host_name(host):
            return host in self.own_hosts or any(host.endswith(domain) for domain in self.own_domains)
        address = ipaddress.ip_address(host)
        server = scope.get("server") or ("", None)  # (the address the connection came in on, port)
        own_address = not address.is_unspecified and address == parse_ip(str(server[0]))
        return address.is_loopback or host in self.own_hosts or own_address

    def token_label(self, token: bytes) -> str | None:
        """The label of the configured token equal to `token`, compared in constant time."""
        digest = hashlib.sha256(token).digest()
        found: str | None = None
        for label, expected in self.token_digests:  # no early exit: every token costs the same
            if hmac.compare_digest(digest, expected) and found is None:
                found = label
        return found

    def _is_cross_site(self, scope: Scope, headers: dict[str, list[str]], *, from_proxy: bool) -> bool:
        origins = headers.get("origin", [])
        origin = normalize_origin(origins[0]) if len(origins) == 1 else None
        listed = origin is not None and origin in self.allowed_origins
        if origins and not listed and (origin is None or origin != self._own_origin(scope, headers, from_proxy)):
            return True
        sites = headers.get("sec-fetch-site", [])
        return bool(sites) and not listed and (len(sites) != 1 or sites[0].strip().lower() not in _SAFE_SITES)

    @staticmethod
    def _own_origin(scope: Scope, headers: dict[str, list[str]], from_proxy: bool) -> str | None:
        scheme = {"ws": "http", "wss": "https"}.get(scope.get("scheme", "http"), scope.get("scheme", "http"))
        forwarded_proto = headers.get("x-forwarded-proto", [])
        if from_proxy and forwarded_proto:
            nearest = forwarded_proto[-1].split(",")[-1].strip().lower()
            if nearest in _DEFAULT_PORTS:
                scheme = nearest
        hosts = headers.get("host", [])
        if len(hosts) != 1:
            return None
        return normalize_origin(f"{scheme}://{hosts[0].strip()}")


def parse_ip(text: str | None) -> IPAddress | None:
    """An IP address, with IPv4-mapped IPv6 (`::ffff:a.b.c.d`) read as IPv4; None if it is not one."""
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_forwarded_entry(entry: str) -> IPAddress | None:
    """One X-Forwarded-For entry: `a.b.c.d`, `a.b.c.d:port`, `v6`, `[v6]` or `[v6]:port`."""
    if entry.startswith("["):
        end = entry.find("]")
        return parse_ip(entry[1:end]) if end > 0 else None
    if entry.count(":") == 1:
        return parse_ip(entry.partition(":")[0])
    return parse_ip(entry)


def normalize_origin(value: str) -> str | None:
    """`scheme://host[:port]` in lower case without a default port, or None if `value` is not an origin."""
    try:
        parts = urlsplit(value.strip().lower())
        port = parts.port
    except ValueError:
        return None
    if (
        parts.scheme not in _DEFAULT_PORTS
        or not parts.hostname
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or "@" in parts.netloc
    ):
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    shown_port = "" if port is None or port == _DEFAULT_PORTS[parts.scheme] else f":{port}"
    return f"{parts.scheme}://{host}{shown_port}"


def _headers(scope: Scope) -> dict[str, list[str]]:
    headers: dict[str, list[str]] = {}
    for name, value in scope.get("headers", []):
        headers.setdefault(name.decode("latin-1").lower(), []).append(value.decode("latin-1"))
    return headers


def _describe_hosts(hosts: list[str]) -> str:
    """How the refusal detail names the Host header(s) received."""
    if not hosts:
        return "No Host header"
    if len(hosts) > 1:
        return f"{len(hosts)} Host headers ({', '.join(json.dumps(host[:100]) for host in hosts)}), one expected"
    return f"Host {json.dumps(hosts[0][:100])} is not a name of this service"


def _bearer_token(values: list[str]) -> bytes | None:
    """The token of a single `Authorization: Bearer <token>` header, or None if malformed."""
    if len(values) != 1:
        return None
    scheme, _, token = values[0].strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or any(c.isspace() for c in token):
        return None
    return token.encode("latin-1")


def is_system_operation(scope: Scope) -> bool:
    """Whether the path is under `/pypnm/system` or in SYSTEM_PATHS (after `root_path`, any slash runs collapsed)."""
    path: str = scope.get("path", "")
    root_path: str = scope.get("root_path", "")
    if root_path and path.startswith(root_path) and path[len(root_path) :].startswith("/"):
        path = path[len(root_path) :]
    path = re.sub(r"/{2,}", "/", path)
    return path == SYSTEM_PREFIX or path.startswith(SYSTEM_PREFIX + "/") or path in SYSTEM_PATHS


def audit(decision: Decision, scope: Scope, status: int) -> None:
    """Write the audit line of one System Operations request."""
    level = logging.INFO if decision.allowed else logging.WARNING
    audit_logger.log(
        level,
        "time=%s client=%s peer=%s host=%s token=%s request_id=%s method=%s route=%s status=%d outcome=%s",
        utc_now(),
        log_field(decision.client),
        log_field(decision.peer),
        log_field(decision.host),
        decision.token_label or "-",
        log_field(request_id_of(scope)),
        log_field(str(scope.get("method", "WEBSOCKET"))),
        log_field(str(scope.get("path", ""))),
        status,
        decision.outcome,
    )


class SystemOperationsGuard:
    """Pure ASGI middleware: applies an AccessPolicy to every System Operations request (is_system_operation)."""

    def __init__(self, app: ASGIApp, policy: AccessPolicy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or not is_system_operation(scope):
            await self.app(scope, receive, send)
            return
        decision = self.policy.decide(scope)
        if not decision.allowed:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            else:
                headers = {"WWW-Authenticate": "Bearer"} if decision.status == 401 else None
                response = JSONResponse({"detail": decision.detail}, status_code=decision.status, headers=headers)
                await response(scope, receive, send)
            audit(decision, scope, decision.status)
            return

        recorder = StatusRecorder(send)
        try:
            await self.app(scope, receive, recorder)
        finally:
            audit(decision, scope, recorder.status)


# ----- the OpenAPI document ---------------------------------------------------------------------

BEARER_SCHEME = "bearerAuth"
_ERROR_SCHEMA = {
    "type": "object",
    "properties": {"detail": {"type": "string", "title": "Detail"}},
    "required": ["detail"],
    "title": "AccessDenied",
}


def document_access(app: FastAPI) -> None:
    """Describe the access rules in `app`'s OpenAPI document: optional bearer auth, 401 and 403."""
    build: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _add_access_rules(build())
        return app.openapi_schema or build()

    app.openapi = openapi  # type: ignore[method-assign]


def _add_access_rules(schema: dict[str, Any]) -> None:
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})[BEARER_SCHEME] = {
        "type": "http",
        "scheme": "bearer",
        "description": "A token from api_tokens or api_tokens_file; not needed from trusted_networks.",
    }
    for path, operations in schema.get("paths", {}).items():
        if not is_system_operation({"path": path}):
            continue
        for operation in _operations(operations):
            operation["security"] = [{}, {BEARER_SCHEME: []}]  # {}: open to trusted_networks without a token
            responses = operation.setdefault("responses", {})
            responses.setdefault("401", _error("Invalid or malformed bearer token"))
            responses.setdefault("403", _error("Untrusted client or Host without a token, or a cross-site request"))


def _operations(operations: dict[str, Any]) -> Iterable[dict[str, Any]]:
    methods = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
    return (operation for method, operation in operations.items() if method in methods)


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": dict(_ERROR_SCHEMA)}}}
