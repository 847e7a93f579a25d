"""etcd's v3 JSON gateway, through the standard library's ``http.client``
(no dependency to install): the address format, and the few calls discovery
needs (lease grant, keep-alive and revoke; put; range over a prefix).

Addresses: ``etcd://HOST[:PORT][,HOST[:PORT]...][/PREFIX][?OPTIONS]``, or
several such URLs separated by commas; ``etcds://`` for TLS. Options:
``cacert``, ``cert``, ``key`` (PEM files, as etcdctl's flags), ``timeout``
(seconds per request, default 1). ``user:password@`` before a host, or
``DPM_DISCOVERY_USER`` / ``DPM_DISCOVERY_PASSWORD``, authenticate (etcd's
``/v3/auth/authenticate``). Default port 2379, default prefix ``/dpm``.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import re
import ssl
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = [
    "DiscoveryError",
    "EtcdConfig",
    "EtcdClient",
    "parse_discovery",
    "check_host",
    "service_key_prefix",
]

DEFAULT_PORT = 2379
DEFAULT_PREFIX = "/dpm"
DEFAULT_TIMEOUT = 1.0


class DiscoveryError(OSError):
    """etcd could not be reached or refused a request."""


@dataclass(frozen=True)
class EtcdConfig:
    """Where etcd is and how to talk to it (see the module's docstring)."""

    endpoints: tuple[tuple[str, int], ...]
    tls: bool = False
    prefix: str = DEFAULT_PREFIX
    cacert: str | None = None
    cert: str | None = None
    key: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = DEFAULT_TIMEOUT

    def describe(self) -> str:
        """The address without credentials, for logs and errors."""
        scheme = "etcds" if self.tls else "etcd"
        hosts = ",".join(_host_port(h, p) for h, p in self.endpoints)
        return f"{scheme}://{hosts}{self.prefix}"


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_discovery(text: str) -> EtcdConfig:
    """An ``etcd://`` or ``etcds://`` address (see the module's docstring);
    ``ValueError`` naming ``discovery`` for anything else."""

    def bad(why: str) -> ValueError:
        return ValueError(f"discovery: {why}, got {text!r}")

    if not isinstance(text, str) or not text.strip():
        raise bad("expected etcd://HOST[:PORT][,HOST[:PORT]...][/PREFIX]")
    scheme: str | None = None
    endpoints: list[tuple[str, int]] = []
    prefix: str | None = None
    options: dict[str, str] = {}
    user: str | None = None
    password: str | None = None
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            raise bad("an empty endpoint")
        if "://" not in piece:
            if scheme is None:
                raise bad("expected etcd:// or etcds:// first")
            piece = f"{scheme}://{piece}"
        try:
            parts = urlsplit(piece)
            port = parts.port or DEFAULT_PORT
        except ValueError as e:
            raise bad(str(e)) from None
        if parts.scheme not in ("etcd", "etcds"):
            raise bad("the scheme must be etcd:// (or etcds:// for TLS)")
        if scheme is not None and parts.scheme != scheme:
            raise bad("all endpoints must use the same scheme")
        scheme = parts.scheme
        if not parts.hostname:
            raise bad("an endpoint without a host")
        endpoints.append((parts.hostname, port))
        if parts.username is not None:
            user, password = unquote(parts.username), unquote(parts.password or "")
        if parts.path not in ("", "/"):
            path = "/" + parts.path.strip("/")
            if prefix is not None and prefix != path:
                raise bad("endpoints name different prefixes")
            prefix = path
        for name, values in parse_qs(parts.query, keep_blank_values=True).items():
            if name not in ("cacert", "cert", "key", "timeout"):
                raise bad(f"unknown option {name!r} (cacert, cert, key, timeout)")
            options[name] = values[-1]
    timeout = DEFAULT_TIMEOUT
    if "timeout" in options:
        try:
            timeout = float(options["timeout"])
        except ValueError:
            timeout = -1.0
        if not 0.01 <= timeout <= 60:
            raise bad("timeout must be a number of seconds from 0.01 to 60")
    if ("cert" in options) != ("key" in options):
        raise bad("cert and key go together")
    tls = scheme == "etcds"
    if not tls and any(k in options for k in ("cacert", "cert", "key")):
        raise bad("cacert, cert and key need etcds://")
    return EtcdConfig(
        endpoints=tuple(endpoints),
        tls=tls,
        prefix=prefix or DEFAULT_PREFIX,
        cacert=options.get("cacert"),
        cert=options.get("cert"),
        key=options.get("key"),
        user=user or os.environ.get("DPM_DISCOVERY_USER") or None,
        password=password if user else os.environ.get("DPM_DISCOVERY_PASSWORD"),
        timeout=timeout,
    )


_HOST_RE = re.compile(r"[A-Za-z0-9.:_\-\[\]%]{1,253}")


def check_host(host: str) -> str:
    """An advertised host name: 1 to 253 of ``A-Z a-z 0-9 . : _ - [ ] %``."""
    if not isinstance(host, str) or not _HOST_RE.fullmatch(host):
        raise ValueError(
            "advertise_host: must be a host name or address (1 to 253 of A-Z, a-z, 0-9 "
            f"and . : _ - [ ] %), got {host!r}"
        )
    return host


def service_key_prefix(prefix: str, service: str) -> str:
    """The keys of one service start with this."""
    return f"{prefix}/services/{service}/"


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode("ascii")


def _unb64(text: str) -> str:
    return base64.b64decode(text).decode("utf-8", "replace")


def _prefix_end(prefix: str) -> str:
    """The range end that makes a range request cover every key under ``prefix``."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1  # prefixes end in "/", never 0xff
    return base64.b64encode(bytes(raw)).decode("ascii")


class EtcdClient:
    """etcd's v3 JSON gateway over ``http.client``: one request at a time (use
    one client per thread), endpoints tried in turn, each with ``timeout``."""

    def __init__(self, config: EtcdConfig) -> None:
        self.config = config
        self._token: str | None = None
        self._preferred = 0
        self._context: ssl.SSLContext | None = None
        if config.tls:
            self._context = ssl.create_default_context(cafile=config.cacert)
            if config.cert:
                self._context.load_cert_chain(config.cert, config.key)

    def _connection(self, host: str, port: int) -> http.client.HTTPConnection:
        timeout = self.config.timeout
        if self._context is not None:
            return http.client.HTTPSConnection(host, port, timeout=timeout, context=self._context)
        return http.client.HTTPConnection(host, port, timeout=timeout)

    def _post(self, path: str, body: dict[str, Any], auth: bool = True) -> dict[str, Any]:
        """One request, to the endpoint that answered last, else the others."""
        payload = json.dumps(body).encode()
        problems = []
        n = len(self.config.endpoints)
        for i in range(n):
            index = (self._preferred + i) % n
            host, port = self.config.endpoints[index]
            headers = {"Content-Type": "application/json"}
            if auth and self._token:
                headers["Authorization"] = self._token
            conn = self._connection(host, port)
            try:
                conn.request("POST", path, payload, headers)
                response = conn.getresponse()
                status, raw = response.status, response.read()
            except (OSError, http.client.HTTPException) as e:
                problems.append(f"{_host_port(host, port)}: {e or type(e).__name__}")
                continue
            finally:
                conn.close()
            self._preferred = index
            try:
                answer = json.loads(raw) if raw else {}
            except ValueError:
                answer = {"error": raw[:200].decode("utf-8", "replace")}
            if not isinstance(answer, dict):
                raise DiscoveryError(f"etcd {path}: not a JSON object: {raw[:200]!r}")
            if status != 200 or (isinstance(answer.get("error"), (str, dict))):
                error = answer.get("error")
                message = (
                    answer.get("message")
                    or (error.get("message") if isinstance(error, dict) else error)
                    or f"HTTP {status}"
                )
                raise DiscoveryError(f"etcd {path}: {message}")
            return answer
        raise DiscoveryError(f"etcd unreachable ({'; '.join(problems)})")

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A request, authenticated first when a user is configured (and once
        more if etcd says the token expired)."""
        if self.config.user and self._token is None:
            self._authenticate()
        try:
            return self._post(path, body)
        except DiscoveryError as e:
            if self.config.user and "token" in str(e):
                self._authenticate()
                return self._post(path, body)
            raise

    def _authenticate(self) -> None:
        answer = self._post(
            "/v3/auth/authenticate",
            {"name": self.config.user, "password": self.config.password or ""},
            auth=False,
        )
        self._token = answer.get("token")

    def grant(self, ttl: int) -> tuple[str, int]:
        """A new lease: its id and the TTL etcd gave (it may raise a small one)."""
        answer = self.call("/v3/lease/grant", {"TTL": str(ttl)})
        return str(answer["ID"]), int(answer.get("TTL", ttl))

    def keepalive(self, lease: str) -> int:
        """Renews a lease; the TTL it now has, 0 if etcd no longer knows it."""
        answer = self.call("/v3/lease/keepalive", {"ID": lease})
        result = answer.get("result", answer)
        return int(result.get("TTL", 0))

    def revoke(self, lease: str) -> None:
        """Ends a lease and deletes its keys (a lease etcd does not know is fine)."""
        try:
            self.call("/v3/lease/revoke", {"ID": lease})
        except DiscoveryError as e:
            if "not found" not in str(e):
                raise

    def put(self, key: str, value: str, lease: str | None = None) -> None:
        body = {"key": _b64(key), "value": _b64(value)}
        if lease is not None:
            body["lease"] = lease
        self.call("/v3/kv/put", body)

    def get_prefix(self, prefix: str) -> list[tuple[str, str]]:
        """Every key under ``prefix`` with its value, in key order."""
        answer = self.call("/v3/kv/range", {"key": _b64(prefix), "range_end": _prefix_end(prefix)})
        return [(_unb64(kv["key"]), _unb64(kv.get("value", ""))) for kv in answer.get("kvs", [])]
