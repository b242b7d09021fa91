"""API keys, tenants and the admin key: who is calling, and what they may do.

- Keys are held only as sha256 digests (from ``api_keys[].key_sha256``, from the
  environment variable an entry names in ``key_env``, or from
  ``GUARDRAIL_API_KEYS="key=tenant,..."``, hashed as it is read). A presented key is
  hashed and compared with every stored digest by :func:`hmac.compare_digest`, with
  no early exit, so the time taken does not depend on which digest (if any) matched.
- A key is sent as ``Authorization: Bearer <key>`` (what the openai SDK sends) or
  ``x-api-key: <key>``. Logs and metrics name a key by its *key id*: the first 8 hex
  digits of its digest. Never the key. Rate limits count by the whole digest
  (:attr:`Principal.bucket`): 8 digits are 32 bits, and two keys of a large key set
  would share a budget.
- A key must be printable ASCII (spaces inside allowed): a header carries no other
  character as the key's UTF-8, so any other key could never be presented. One from
  ``key_env``, ``GUARDRAIL_API_KEYS`` or ``GUARDRAIL_ADMIN_KEY`` is refused at startup
  (:func:`guardrail.settings.key_problem`).
- :class:`AuthMiddleware` runs after the request id is set and before any handler:

  ==========================  ==================================================
  path                        needs
  ==========================  ==================================================
  /healthz, /readyz           nothing (probes)
  /admin/review/ui            nothing (a page with no data; its calls carry the key)
  /openapi...                 nothing (the schema is public)
  /metrics                    nothing, or the admin key with metrics_require_admin_key
  /admin/...                  the admin key
  everything else             a tenant key (when any key is configured)
  ==========================  ==================================================

  It answers 401 (no key: ``missing_api_key``; a key nobody issued:
  ``invalid_api_key``; two different keys, in ``Authorization`` and ``x-api-key``:
  ``ambiguous_api_key``) and 403 (a tenant key on an admin route: ``admin_key_required``;
  the admin key on an API route: ``tenant_key_required``; an admin route with no admin
  key configured: ``admin_disabled``; with no key at all, an admin route called from
  another machine: ``admin_local_only``), each in the OpenAI error shape, and puts the
  :class:`Principal` in ``scope["state"]["principal"]``.
- With no API key configured at all, the API routes are **open**: every request is
  tenant ``default``, and :func:`open_mode_warning` says so at startup. The admin
  routes are then open to loopback clients only (:func:`from_this_machine`) that name
  this machine in ``Host`` (:func:`names_this_machine`).
- Before any key is checked, a request a web page of another site made a browser send
  is refused: 403 ``cross_origin_refused`` (:func:`cross_site_refusal`). Keys are
  headers, never cookies, so a page cannot borrow a keyed caller's rights; but in open
  mode every page the user visits could spend the model (a ``no-cors`` POST with a Blob
  body has no content type, no preflight), and a browser on this machine is "this
  machine" to the admin routes.

What a tenant may do (its policy, models and rate limits) is :class:`Tenants`; the
serving layer asks it (403 ``model_not_allowed``).
"""

from __future__ import annotations

import difflib
import hashlib
import hmac
import ipaddress
import os
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import msgspec
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, Scope, Send

from guardrail.api.errors import APIError
from guardrail.errors import ConfigError
from guardrail.policy.model import Policy, ScopedTenant, scope_matches
from guardrail.settings import Settings, TenantConfig, key_problem

DEFAULT_TENANT = "default"
OPEN_KEY_ID = "open"
ADMIN_KEY_ID = "admin"
# The review page holds no data: it asks for the admin key and sends it with each call.
_OPEN_PATHS = frozenset({"/healthz", "/readyz", "/admin/review/ui"})

OnRejected = Callable[[str, str, int, str, Any], None]


def key_id(digest: bytes) -> str:
    """The name logs use for a key: 8 hex digits of its sha256."""
    return digest.hex()[:8]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the tenant, and which key (by id) they used.

    ``digest``: the key's whole sha256 (hex), what its rate-limit buckets are keyed by;
    empty for the open and admin principals, whose buckets are their ids.
    """

    tenant: str
    key_id: str
    admin: bool = False
    digest: str = ""

    @property
    def bucket(self) -> str:
        """The rate limiter's key: the whole digest, never the 8-digit id (two keys may
        share an id; they must not share a budget)."""
        return self.digest or self.key_id


OPEN_PRINCIPAL = Principal(DEFAULT_TENANT, OPEN_KEY_ID)


class KeyRing:
    """Tenant keys and the admin key, as sha256 digests only.

    Example::

        ring = KeyRing.from_settings(settings)
        principal = ring.identify("sk-...")   # None: no such key
    """

    def __init__(self, keys: Mapping[bytes, str], admin_digest: bytes | None = None) -> None:
        self._keys = tuple(keys.items())
        self._admin = admin_digest

    @classmethod
    def from_settings(cls, settings: Settings, environ: Mapping[str, str] | None = None) -> KeyRing:
        env = os.environ if environ is None else environ
        keys: dict[bytes, str] = {}
        admin = bytes.fromhex(settings.admin_key_sha256) if settings.admin_key_sha256 else None
        for n, entry in enumerate(settings.api_keys):
            if entry.key_sha256 is not None:
                digest = bytes.fromhex(entry.key_sha256)
            else:
                # Stripped as presented keys are (a secret file often ends in a line break).
                value = env.get(entry.key_env or "", "").strip()
                if not value:
                    raise ConfigError(
                        f"api_keys[{n}]: environment variable {entry.key_env} is not set"
                    )
                problem = key_problem(value)
                if problem:
                    raise ConfigError(
                        f"api_keys[{n}]: the key in environment variable {entry.key_env} {problem}"
                    )
                digest = hashlib.sha256(value.encode("utf-8")).digest()
            # Never name the key itself: its id is enough to find the two entries.
            if digest in keys:
                raise ConfigError(
                    f"api_keys[{n}]: key {key_id(digest)} is listed twice (tenants "
                    f"{keys[digest]!r} and {entry.tenant!r}); a key belongs to one tenant"
                )
            if digest == admin:
                raise ConfigError(
                    f"api_keys[{n}]: key {key_id(digest)} is also the admin key; "
                    "give the admin its own key"
                )
            keys[digest] = entry.tenant
        return cls(keys, admin)

    @property
    def open(self) -> bool:
        """No tenant key configured: the API routes take anyone."""
        return not self._keys

    @property
    def has_admin(self) -> bool:
        return self._admin is not None

    @property
    def tenants(self) -> set[str]:
        """The tenants some key acts for."""
        return {t for _, t in self._keys}

    def identify(self, key: str) -> Principal | None:
        """The principal for a presented key, or None. Constant time in which key matched."""
        digest = hashlib.sha256(key.encode("utf-8")).digest()
        found: Principal | None = None
        for stored, tenant in self._keys:
            if hmac.compare_digest(stored, digest):
                found = Principal(tenant, key_id(digest), digest=digest.hex())
        if self._admin is not None and hmac.compare_digest(self._admin, digest):
            found = Principal(DEFAULT_TENANT, ADMIN_KEY_ID, admin=True)
        return found

    def describe(self) -> dict[str, Any]:
        """For the startup log: counts and key ids, never keys."""
        return {
            "api_keys": len(self._keys),
            "key_ids": sorted(key_id(d) for d, _ in self._keys),
            "tenants": sorted({t for _, t in self._keys}),
            "admin_key": self.has_admin,
        }


@dataclass(frozen=True, slots=True)
class TenantRules:
    """One tenant's effective settings (defaults filled in)."""

    name: str
    policy: str
    models: frozenset[str]
    requests_per_minute: int
    tokens_per_minute: int

    def allows_model(self, model: str) -> bool:
        return not self.models or model in self.models


class Tenants:
    """Tenant name -> :class:`TenantRules`; unlisted tenants get the gateway defaults."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._rules = {name: self._make(name, cfg) for name, cfg in settings.tenants.items()}
        self._default = self._make(DEFAULT_TENANT, TenantConfig())

    def _make(self, name: str, cfg: TenantConfig) -> TenantRules:
        s = self._settings
        return TenantRules(
            name=name,
            policy=cfg.policy or s.policy,
            models=frozenset(cfg.models),
            requests_per_minute=(
                s.rate_limit_requests_per_minute
                if cfg.requests_per_minute is None
                else cfg.requests_per_minute
            ),
            tokens_per_minute=(
                s.rate_limit_tokens_per_minute
                if cfg.tokens_per_minute is None
                else cfg.tokens_per_minute
            ),
        )

    def get(self, tenant: str) -> TenantRules:
        rules = self._rules.get(tenant)
        if rules is None:
            return TenantRules(
                tenant,
                self._default.policy,
                self._default.models,
                self._default.requests_per_minute,
                self._default.tokens_per_minute,
            )
        return rules

    def policies(self) -> set[str]:
        """Every policy file some tenant uses, besides the default."""
        return {r.policy for r in self._rules.values()} - {self._settings.policy}


def unused_tenants(settings: Settings, ring: KeyRing) -> list[tuple[str, str | None]]:
    """``tenants:`` entries no request can ever be served as (no key acts for them; in
    open mode, every one but ``default``), each with the key's tenant it nearly spells,
    if one does: a misspelt entry leaves that tenant on the default policy, every model
    and the default limits while its operator believes its own are in force."""
    used = {DEFAULT_TENANT} if ring.open else ring.tenants
    lowered = {t.lower(): t for t in used}
    out = []
    for name in sorted(set(settings.tenants) - used):
        close = lowered.get(name.lower()) or next(
            iter(difflib.get_close_matches(name, sorted(used), n=1, cutoff=0.8)), None
        )
        out.append((name, close))
    return out


def unmatched_scope_tenants(
    policy: Policy, served: Collection[str]
) -> list[tuple[ScopedTenant, str | None]]:
    """The tenant patterns of ``policy``'s rule scopes that match none of the tenants it
    ``served``, each with the tenant it nearly spells, if one does: a rule scoped to
    ``Acme`` where the keys act for ``acme`` applies to nobody, silently (a block rule
    that blocks nothing)."""
    lowered = {t.lower(): t for t in served}
    out = []
    for scoped in policy.scoped_tenants:
        if any(scope_matches(scoped.pattern, t) for t in served):
            continue
        close = lowered.get(scoped.pattern.lower()) or next(
            iter(difflib.get_close_matches(scoped.pattern, sorted(served), n=1, cutoff=0.8)),
            None,
        )
        out.append((scoped, close))
    return out


def open_mode_warning(ring: KeyRing) -> str | None:
    """The startup warning for a gateway whose API routes anyone may call, if it is one."""
    if not ring.open:
        return None
    warning = "running OPEN: no API keys configured; anyone who can reach this port may use it"
    if not ring.has_admin:
        warning += "; /admin/* answers requests from this machine only"
    return warning


def principal_of(scope: Scope) -> Principal:
    state = scope.get("state") or {}
    principal = state.get("principal")
    return principal if isinstance(principal, Principal) else OPEN_PRINCIPAL


def from_this_machine(scope: Scope) -> bool:
    """Whether the request came from a loopback address (127.0.0.0/8, ::1).

    uvicorn puts the address a trusted local proxy forwarded (``X-Forwarded-For`` from
    ``forwarded_allow_ips``, 127.0.0.1 by default) in ``client``, so a request relayed by a
    proxy on this machine counts as from where it really came. No address (a Unix
    socket, a server that does not say) is not "this machine": fail closed.
    """
    client = scope.get("client")
    if not client:
        return False
    try:
        address = ipaddress.ip_address(str(client[0]).split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1").strip()
    return None


def names_this_machine(scope: Scope) -> bool:
    """Whether the ``Host`` header names this machine: ``localhost`` (or a name under
    ``.localhost``), 127.0.0.0/8 or ``[::1]``, any port.

    A page on another site can point its own name at 127.0.0.1 (DNS rebinding): the
    browser then calls this machine as that site, same origin, from a loopback address.
    Only the name it sends in ``Host`` tells such a call apart. No ``Host``: fail closed.
    """
    host = (_header(scope, b"host") or "").lower()
    if host.startswith("["):
        name = host[1 : host.find("]")] if "]" in host else ""
    else:
        name, _, port = host.rpartition(":")
        if not name or not port.isdigit():
            name = host
    name = name.removesuffix(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def cross_site_refusal(scope: Scope, *, admin: bool, cors_origins: Collection[str]) -> str | None:
    """Why a request a browser sent for a page of another site is refused, or None.

    Browsers send ``Origin`` with every cross-origin request but a GET that needs no
    CORS (a ``no-cors`` POST included), and ``Sec-Fetch-Site`` with every request; clients
    that are not browsers send neither, and are never refused here. Allowed: the
    gateway's own origin (the one ``Host`` names, or what the browser calls
    ``same-origin``: a proxy may have rewritten ``Host``), and on the API routes the
    origins in ``cors_origins`` (``*``: any). ``Origin: null`` (a sandboxed frame, a
    ``file:`` or ``data:`` page) is no origin anyone can list. The admin routes take no
    other site's page, whatever ``cors_origins`` says: the review page the gateway
    serves calls them from its own origin.
    """
    origin = _header(scope, b"origin")
    site = (_header(scope, b"sec-fetch-site") or "").lower()
    if origin is None:
        # A GET a page made (an image, a form, a script): only Sec-Fetch-Site names it.
        if site not in ("cross-site", "same-site") or (not admin and "*" in cors_origins):
            return None
    elif origin.lower() != "null":
        host = (_header(scope, b"host") or "").lower()
        if (host and _netloc(origin) == host) or site == "same-origin":
            return None
        if not admin and ("*" in cors_origins or origin in cors_origins):
            return None
    return _ADMIN_CROSS_SITE if admin else _CROSS_SITE


def _netloc(origin: str) -> str:
    """``host[:port]`` of an ``Origin``, lower case ("" for one that is not a URL)."""
    try:
        return urlsplit(origin).netloc.lower()
    except ValueError:  # "http://[::1": an unclosed address
        return ""


def _presented_keys(scope: Scope) -> set[str]:
    """Every key the request carries, in either header (each header as often as sent).

    More than one different key is refused, never picked from: which header came first
    decided the tenant, and a proxy's own ``Authorization`` in front of the client's
    ``x-api-key`` made a valid client a 401 or the proxy's token a tenant's.
    """
    keys = set()
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                keys.add(token.strip())
        elif name == b"x-api-key" and value.strip():
            keys.add(value.decode("latin-1").strip())
    return keys


_MISSING = (
    "No API key given: send it as 'Authorization: Bearer <key>' (or in the x-api-key header)."
)
_INVALID = "The API key given is not valid (not a key this gateway issued)."
_AMBIGUOUS = (
    "Two different API keys were given (in Authorization and x-api-key): send one key, "
    "in one header."
)


class AuthMiddleware:
    """Checks the key of every HTTP request (see the module docstring for the rules)."""

    def __init__(
        self,
        app: ASGIApp,
        ring: KeyRing,
        *,
        metrics_need_admin: bool = False,
        cors_origins: Collection[str] = (),
        on_rejected: OnRejected | None = None,
    ) -> None:
        self.app = app
        self.ring = ring
        self.metrics_need_admin = metrics_need_admin
        self.cors_origins = frozenset(cors_origins)
        self.on_rejected = on_rejected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        state = scope.setdefault("state", {})
        need = self._need(path)
        if need == "none":
            state["principal"] = OPEN_PRINCIPAL
            await self.app(scope, receive, send)
            return
        refusal = cross_site_refusal(scope, admin=need == "admin", cors_origins=self.cors_origins)
        if refusal is not None:
            await self._reject(scope, send, 403, "cross_origin_refused", refusal)
            return
        if need == "tenant" and self.ring.open:
            state["principal"] = OPEN_PRINCIPAL
            await self.app(scope, receive, send)
            return
        if need == "admin" and not self.ring.has_admin:
            if not self.ring.open:
                await self._reject(scope, send, 403, "admin_disabled", _ADMIN_DISABLED)
                return
            # Nothing configured at all: open like the API routes, but to this machine
            # only. The review queue holds exchanges' text, and a reload or a shadow
            # switch is an operator's act, not any caller's.
            if not from_this_machine(scope):
                await self._reject(scope, send, 403, "admin_local_only", _ADMIN_LOCAL_ONLY)
                return
            if not names_this_machine(scope):
                await self._reject(scope, send, 403, "admin_local_only", _ADMIN_LOCAL_HOST)
                return
            state["principal"] = OPEN_PRINCIPAL
            await self.app(scope, receive, send)
            return
        keys = _presented_keys(scope)
        if not keys:
            await self._reject(scope, send, 401, "missing_api_key", _MISSING)
            return
        if len(keys) > 1:
            await self._reject(scope, send, 401, "ambiguous_api_key", _AMBIGUOUS)
            return
        principal = self.ring.identify(keys.pop())
        if principal is None:
            await self._reject(scope, send, 401, "invalid_api_key", _INVALID)
            return
        if need == "admin" and not principal.admin:
            await self._reject(scope, send, 403, "admin_key_required", _ADMIN_REQUIRED)
            return
        if need == "tenant" and principal.admin:
            await self._reject(scope, send, 403, "tenant_key_required", _TENANT_REQUIRED)
            return
        state["principal"] = principal
        await self.app(scope, receive, send)

    def _need(self, path: str) -> str:
        if path in _OPEN_PATHS or path == "/openapi" or path.startswith("/openapi/"):
            return "none"
        if path == "/metrics":
            return "admin" if self.metrics_need_admin else "none"
        if path.startswith("/admin/") or path == "/admin":
            return "admin"
        return "tenant"

    async def _reject(self, scope: Scope, send: Send, status: int, code: str, message: str) -> None:
        rid = str((scope.get("state") or {}).get("request_id") or "")
        if self.on_rejected is not None:
            self.on_rejected(scope["path"], rid, status, code, scope)
        await send_error(send, APIError(status, message, code=code))


_ADMIN_DISABLED = "Admin routes are disabled: no admin key is configured (GUARDRAIL_ADMIN_KEY)."
_ADMIN_LOCAL_ONLY = (
    "With no keys configured, admin routes answer requests from this machine only; "
    "set an admin key (GUARDRAIL_ADMIN_KEY) to reach them from elsewhere."
)
_ADMIN_LOCAL_HOST = (
    "With no keys configured, admin routes answer this machine only, called by a loopback "
    "name (localhost, 127.0.0.1, [::1]) in the Host header; set an admin key "
    "(GUARDRAIL_ADMIN_KEY) to call them by another name."
)
_CROSS_SITE = (
    "Requests from web pages of other origins are refused: list the page's origin in "
    "cors_origins to let it call the gateway."
)
_ADMIN_CROSS_SITE = "Admin routes refuse requests from web pages of other origins."
_ADMIN_REQUIRED = "This route needs the admin key; the key given is a tenant key."
_TENANT_REQUIRED = "The admin key is for /admin routes only; call the API with a tenant key."
_encode = msgspec.json.Encoder().encode


async def send_error(send: Send, error: APIError) -> None:
    """Answer an :class:`APIError` straight from ASGI (for middleware, before any handler)."""
    body = _encode(error.body())
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    if error.status == 401:
        headers.append((b"www-authenticate", b'Bearer realm="guardrail"'))
    headers.extend((k.encode("latin-1"), v.encode("latin-1")) for k, v in error.headers.items())
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


__all__ = [
    "DEFAULT_TENANT",
    "OPEN_PRINCIPAL",
    "AuthMiddleware",
    "KeyRing",
    "Principal",
    "TenantRules",
    "Tenants",
    "cross_site_refusal",
    "key_id",
    "names_this_machine",
    "open_mode_warning",
    "principal_of",
    "send_error",
    "unmatched_scope_tenants",
    "unused_tenants",
]
