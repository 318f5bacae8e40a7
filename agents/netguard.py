"""SSRF guard for outgoing HTTP: refuse internal addresses unless the operator allow-listed them.

A workflow author chooses the URLs of ``http`` steps (and an ``llm`` step's ``base_url``). Left
alone, a step could read the cloud metadata service (``http://169.254.169.254/``), the worker's
own loopback services or anything on the private network: server-side request forgery (OWASP
"Server Side Request Forgery Prevention Cheat Sheet"). The guard sits where the connection is
made, not where the URL is parsed, so it also covers redirects (every hop opens its connection
through it) and DNS answers (the name is resolved once, every address is checked, and the socket
connects to the checked address, so a second, different DNS answer cannot slip in: DNS
rebinding).

Refused destinations (after unwrapping IPv4-mapped ``::ffff:a.b.c.d``, 6to4 ``2002::/16`` and
NAT64 ``64:ff9b::/96`` IPv6 addresses to the IPv4 address they carry): loopback, link-local
(169.254.0.0/16, fe80::/10), private ranges (10/8, 172.16/12, 192.168/16, fc00::/7), shared
address space (100.64/10), unspecified, multicast, reserved, and anything else Python's
``ipaddress`` does not call global.

``ORCHESTRATOR_HTTP_ALLOW_HOSTS`` (comma-separated) lets chosen destinations through. An entry is
a host name (``agents.internal``, ``localhost``), an IP address (``127.0.0.1``, ``::1``) or a
CIDR network (``10.1.0.0/16``), each optionally with ``:port`` (``[::1]:8080`` for IPv6) to allow
that port only. The origins the operator configured (``ORCHESTRATOR_AGENTS_BASE_URL``,
``ORCHESTRATOR_DATA_SERVICE_URL``, ``ORCHESTRATOR_LLM_BASE_URL``, the fallbacks, ``GEMINI_BASE_URL``) are allowed
too, host and port exactly: a workflow cannot choose them, so they need no listing.
"""

from __future__ import annotations

import ipaddress
import socket
import typing
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import urlsplit

import httpcore
import httpx

__all__ = [
    "BlockedAddress",
    "GuardedTransport",
    "address_problem",
    "allow_list",
    "check_host",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SHARED = ipaddress.ip_network("100.64.0.0/10")

#: Settings naming the endpoints the operator configured; their exact origins are allowed.
CONFIGURED_URL_SETTINGS = (
    "ORCHESTRATOR_AGENTS_BASE_URL",
    "ORCHESTRATOR_DATA_SERVICE_URL",
    "ORCHESTRATOR_LLM_BASE_URL",
    "GEMINI_BASE_URL",  # the LLM router's Gemini fallback (an operator may point it at a proxy)
)


class BlockedAddress(httpx.ConnectError):
    """A connection to a refused destination was not opened.

    A subclass of ``httpx.ConnectError`` so generic HTTP error handling still sees a failed
    connection; the ``http`` handler catches it first and fails the step permanently (retrying
    cannot help). ``host`` is the name asked for, ``address`` the refused IP, ``reason`` why.
    """

    def __init__(self, host: str, port: int | None, address: str, reason: str) -> None:
        self.host, self.port, self.address, self.reason = host, port, address, reason
        shown = host if host == address else f"{host} ({address})"
        super().__init__(
            f"refused to connect to {shown}: {reason} address; "
            f"add the host to ORCHESTRATOR_HTTP_ALLOW_HOSTS to allow it"
        )


@dataclass(frozen=True)
class _Entry:
    """One allow-list entry: a host name, or an address network; ``port`` None means any port."""

    name: str | None
    network: IPNetwork | None
    port: int | None

    def matches(self, host: str, address: IPAddress | None, port: int | None) -> bool:
        if self.port is not None and port != self.port:
            return False
        if self.name is not None:
            return host.lower().rstrip(".") == self.name
        return address is not None and self.network is not None and address in self.network


def _parse_entry(raw: str) -> _Entry:
    """``host``, ``host:port``, ``1.2.3.4``, ``10.0.0.0/8:443``, ``::1``, ``[::1]:80`` -> _Entry.

    Raises ValueError on an entry that is none of these.
    """
    text = raw.strip()
    port: int | None = None
    if text.startswith("["):  # [v6] or [v6]:port
        inner, _, rest = text[1:].partition("]")
        text = inner
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"bad allow-list entry {raw!r}")
            port = int(rest[1:])
    elif text.count(":") == 1:  # host:port or v4:port (a bare IPv6 has several colons)
        text, _, port_text = text.partition(":")
        port = int(port_text)
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"bad port in allow-list entry {raw!r}")
    try:
        return _Entry(None, ipaddress.ip_network(text, strict=False), port)
    except ValueError:
        pass
    name = text.lower().rstrip(".")
    if not name or any(c.isspace() or c in "/@" for c in name):
        raise ValueError(f"bad allow-list entry {raw!r}")
    return _Entry(name, None, port)


def _origin_entry(url: str) -> _Entry | None:
    """The exact host:port of a configured URL as an allow-list entry (None if unusable)."""
    try:
        parts = urlsplit(url.strip())
        host = parts.hostname
        port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    except ValueError:
        return None
    if not host:
        return None
    try:
        return _Entry(None, ipaddress.ip_network(host), port)
    except ValueError:
        return _Entry(host.lower().rstrip("."), None, port)


@lru_cache(maxsize=8)
def _compile(allow: tuple[str, ...], configured: tuple[str, ...]) -> tuple[_Entry, ...]:
    entries = [_parse_entry(item) for item in allow if item.strip()]
    for url in configured:
        entry = _origin_entry(url)
        if entry is not None:
            entries.append(entry)
    return tuple(entries)


def allow_list() -> tuple[_Entry, ...]:
    """The allow-list in force: ``ORCHESTRATOR_HTTP_ALLOW_HOSTS`` plus the configured origins.

    Read from Django settings on every call (tests override them), compiled once per value.
    Raises ValueError for a malformed entry.
    """
    from django.conf import settings

    raw = getattr(settings, "ORCHESTRATOR_HTTP_ALLOW_HOSTS", ()) or ()
    if isinstance(raw, str):
        raw = raw.split(",")
    configured = [getattr(settings, name, "") or "" for name in CONFIGURED_URL_SETTINGS]
    configured += list(getattr(settings, "ORCHESTRATOR_LLM_FALLBACK_URLS", ()) or ())
    return _compile(tuple(str(item) for item in raw), tuple(u for u in configured if u))


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries (mapped, 6to4, NAT64, Teredo client), or None."""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.teredo is not None:
        return address.teredo[1]
    return None


def address_problem(address: IPAddress) -> str | None:
    """Why ``address`` is refused ("loopback", "link-local", "private"...), or None if it is public."""
    inner = _embedded_ipv4(address)
    if inner is not None:
        problem = address_problem(inner)
        return f"{problem} (IPv4 {inner} inside IPv6)" if problem else None
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("shared address space", isinstance(address, ipaddress.IPv4Address) and address in _SHARED),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
        ("non-global", not address.is_global),
    )
    for reason, hit in checks:
        if hit:
            return reason
    return None


def _literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%", 1)[0])
    except ValueError:
        return None


def check_host(host: str, port: int | None, addresses: typing.Iterable[str] | None = None) -> list[str]:
    """The addresses of ``host`` that may be connected to, in resolver order.

    ``addresses`` are the resolved IPs (resolved here with ``getaddrinfo`` when None). A host or
    address on the allow-list passes whatever it resolves to; otherwise every resolved address
    must be public, since the socket could reach any of them.

    Raises:
        BlockedAddress: an address is refused (the first one found).
        OSError (socket.gaierror): the name does not resolve.
    """
    entries = allow_list()
    literal = _literal(host)
    allowed_by_name = any(e.matches(host, literal, port) for e in entries if e.name is not None)
    if addresses is None:
        if literal is not None:
            addresses = [str(literal)]
        else:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            addresses = list(dict.fromkeys(info[4][0] for info in infos))
    result = []
    for text in addresses:
        address = ipaddress.ip_address(text.split("%", 1)[0])
        if not allowed_by_name and not any(e.matches(host, address, port) for e in entries if e.network is not None):
            problem = address_problem(address)
            if problem:
                raise BlockedAddress(host, port, str(address), problem)
        result.append(text)
    return result


class _GuardedBackend(httpcore.NetworkBackend):
    """httpcore's sync backend with the guard in ``connect_tcp``: checked address, pinned socket."""

    def __init__(self) -> None:
        self._backend = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: typing.Iterable[typing.Any] | None = None,
    ) -> httpcore.NetworkStream:
        try:
            addresses = check_host(host, port)
        except socket.gaierror as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc.strerror or exc}") from None
        last: Exception | None = None
        for address in addresses:
            try:
                # Connect to the address just checked, never to the name again (DNS rebinding).
                return self._backend.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                last = exc
        assert last is not None
        raise last

    def connect_unix_socket(self, *args: typing.Any, **kwargs: typing.Any) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("unix sockets are not allowed for outgoing calls")

    def sleep(self, seconds: float) -> None:
        self._backend.sleep(seconds)


class GuardedTransport(httpx.HTTPTransport):
    """``httpx.HTTPTransport`` whose every connection goes through the SSRF guard.

    Environment proxies are not used (a proxy would connect on our behalf, out of the guard's
    sight); TLS certificate checks and connection pooling are httpx's own.
    """

    def __init__(self, *, verify: bool = True, http2: bool = False) -> None:
        super().__init__(verify=verify, trust_env=False, http2=http2)
        ssl_context = httpx.create_ssl_context(verify=verify, trust_env=False)
        limits = httpx.Limits()
        self._pool = httpcore.ConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=http2,
            network_backend=_GuardedBackend(),
        )
