"""SSRF guard for outgoing HTTP: refuse internal addresses unless the operator allow-listed them.

A workflow author chooses the URLs of ``http`` steps (and an ``llm`` step's ``base_url``). Left
alone, a step could read the cloud metadata service (``http://169.254.169.254/``), the worker's
own loopback services or anything on the private network: server-side request forgery (OWASP
"Server Side Request Forgery Prevention Cheat Sheet"). The guard sits where the connection is
made, not where the URL is parsed, so it also covers redirects (every hop opens its connection
through it) and DNS answers (the name is resolved once, every address is checked, and the socket
connects to the checked address, so a second, different DNS answer cannot slip in: DNS
rebinding).

Refused destinations: every range of IANA's special-purpose address registries (RFC 6890;
"IANA IPv4 Special-Purpose Address Registry" and "IANA IPv6 Special-Purpose Address Registry"),
listed in :data:`SPECIAL_PURPOSE` with the RFC of each, plus multicast, 240.0.0.0/4 and, for IPv6,
anything outside global unicast ``2000::/3``. The table is explicit on purpose: Python's
``ipaddress.is_global`` calls some special-purpose addresses global (3.11: ``192.0.0.192``), so it
is not consulted. IPv4-mapped ``::ffff:a.b.c.d``, NAT64 ``64:ff9b::/96`` and 6to4 ``2002::/16``
addresses are judged by the IPv4 address they carry.

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

from orchestrator_site.conf import conf

__all__ = [
    "SPECIAL_PURPOSE",
    "BlockedAddress",
    "GuardedTransport",
    "address_problem",
    "allow_list",
    "check_host",
    "special_range",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_NAT64 = ipaddress.ip_network("64:ff9b::/96")
#: IPv6 global unicast (RFC 4291 section 2.4, IANA "IPv6 Address Space"): everything else is refused.
_GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")


@dataclass(frozen=True)
class SpecialRange:
    """One row of :data:`SPECIAL_PURPOSE`: a network, what it is, and the RFC that assigns it.

    ``carries_ipv4``: the address embeds an IPv4 address (mapped, NAT64, 6to4) and is judged by it.
    """

    network: IPNetwork
    name: str
    rfc: str
    carries_ipv4: bool = False


def _ranges(rows: tuple[tuple[str, str, str], ...], carriers: frozenset[str] = frozenset()) -> tuple[SpecialRange, ...]:
    built = [SpecialRange(ipaddress.ip_network(cidr), name, rfc, cidr in carriers) for cidr, name, rfc in rows]
    # most specific first, so 0.0.0.0/32 is "unspecified" rather than "this network"
    return tuple(sorted(built, key=lambda r: -r.network.prefixlen))


#: IANA IPv4 Special-Purpose Address Registry (as of 2025), plus multicast and class E. Every
#: row is refused, including the few the registry marks globally reachable (anycast services):
#: an http step has no business calling them.
SPECIAL_PURPOSE_V4 = _ranges(
    (
        ("0.0.0.0/32", "unspecified", "RFC 1122 section 3.2.1.3"),
        ("0.0.0.0/8", "this network", "RFC 791 section 3.2"),
        ("10.0.0.0/8", "private", "RFC 1918"),
        ("100.64.0.0/10", "shared address space", "RFC 6598"),
        ("127.0.0.0/8", "loopback", "RFC 1122 section 3.2.1.3"),
        ("169.254.0.0/16", "link-local", "RFC 3927"),
        ("172.16.0.0/12", "private", "RFC 1918"),
        ("192.0.0.0/24", "IETF protocol assignments", "RFC 6890 section 2.1"),
        ("192.0.0.0/29", "IPv4 service continuity prefix", "RFC 7335"),
        ("192.0.0.8/32", "IPv4 dummy address", "RFC 7600"),
        ("192.0.0.9/32", "port control protocol anycast", "RFC 7723"),
        ("192.0.0.10/32", "traversal using relays around NAT anycast", "RFC 8155"),
        ("192.0.0.170/31", "NAT64/DNS64 discovery", "RFC 8880"),
        ("192.0.2.0/24", "documentation (TEST-NET-1)", "RFC 5737"),
        ("192.31.196.0/24", "AS112-v4", "RFC 7535"),
        ("192.52.193.0/24", "AMT", "RFC 7450"),
        ("192.88.99.0/24", "deprecated 6to4 relay anycast", "RFC 7526"),
        ("192.168.0.0/16", "private", "RFC 1918"),
        ("192.175.48.0/24", "direct delegation AS112 service", "RFC 7534"),
        ("198.18.0.0/15", "benchmarking", "RFC 2544"),
        ("198.51.100.0/24", "documentation (TEST-NET-2)", "RFC 5737"),
        ("203.0.113.0/24", "documentation (TEST-NET-3)", "RFC 5737"),
        ("224.0.0.0/4", "multicast", "RFC 5771"),
        ("240.0.0.0/4", "reserved", "RFC 1112 section 4"),
        ("255.255.255.255/32", "limited broadcast", "RFC 8190"),
    )
)

#: IANA IPv6 Special-Purpose Address Registry (as of 2025), plus multicast and site-local;
#: addresses outside 2000::/3 not listed here are refused as "not global unicast".
SPECIAL_PURPOSE_V6 = _ranges(
    (
        ("::/128", "unspecified", "RFC 4291 section 2.5.2"),
        ("::1/128", "loopback", "RFC 4291 section 2.5.3"),
        ("::ffff:0:0/96", "IPv4-mapped", "RFC 4291 section 2.5.5.2"),
        ("64:ff9b::/96", "IPv4/IPv6 translation", "RFC 6052"),
        ("64:ff9b:1::/48", "local-use IPv4/IPv6 translation", "RFC 8215"),
        ("100::/64", "discard-only", "RFC 6666"),
        ("100:0:0:1::/64", "dummy IPv6 prefix", "RFC 9780"),
        ("2001::/23", "IETF protocol assignments", "RFC 2928"),
        ("2001::/32", "Teredo", "RFC 4380"),
        ("2001:1::1/128", "port control protocol anycast", "RFC 7723"),
        ("2001:1::2/128", "traversal using relays around NAT anycast", "RFC 8155"),
        ("2001:1::3/128", "DNS-SD service registration protocol anycast", "RFC 9665"),
        ("2001:2::/48", "benchmarking", "RFC 5180"),
        ("2001:3::/32", "AMT", "RFC 7450"),
        ("2001:4:112::/48", "AS112-v6", "RFC 7535"),
        ("2001:10::/28", "deprecated ORCHID", "RFC 4843"),
        ("2001:20::/28", "ORCHIDv2", "RFC 7343"),
        ("2001:30::/28", "drone remote ID protocol entity tags", "RFC 9374"),
        ("2001:db8::/32", "documentation", "RFC 3849"),
        ("2002::/16", "6to4", "RFC 3056"),
        ("2620:4f:8000::/48", "direct delegation AS112 service", "RFC 7534"),
        ("3fff::/20", "documentation", "RFC 9637"),
        ("5f00::/16", "segment routing SIDs", "RFC 9602"),
        ("fc00::/7", "private (unique local)", "RFC 4193"),
        ("fe80::/10", "link-local", "RFC 4291 section 2.5.6"),
        ("fec0::/10", "deprecated site-local", "RFC 3879"),
        ("ff00::/8", "multicast", "RFC 4291 section 2.7"),
    ),
    carriers=frozenset({"::ffff:0:0/96", "64:ff9b::/96", "2002::/16"}),
)

#: Both tables (tests walk every row).
SPECIAL_PURPOSE = SPECIAL_PURPOSE_V4 + SPECIAL_PURPOSE_V6

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

    raw = conf.http_allow_hosts or ()
    if isinstance(raw, str):
        raw = raw.split(",")
    configured = [getattr(settings, name, "") or "" for name in CONFIGURED_URL_SETTINGS]
    configured += list(conf.llm_fallback_urls or ())
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


def special_range(address: IPAddress) -> SpecialRange | None:
    """The most specific :data:`SPECIAL_PURPOSE` row holding ``address``, or None."""
    table = SPECIAL_PURPOSE_V4 if isinstance(address, ipaddress.IPv4Address) else SPECIAL_PURPOSE_V6
    for row in table:
        if address in row.network:
            return row
    return None


def address_problem(address: IPAddress) -> str | None:
    """Why ``address`` is refused, or None if it may be connected to.

    The reason is the special-purpose range's name and RFC (``"loopback (RFC 1122 section
    3.2.1.3)"``, ``"IETF protocol assignments (RFC 6890 section 2.1)"``); an IPv6 address that
    carries an IPv4 one (mapped, NAT64, 6to4, Teredo) gives the IPv4 address's reason first.
    """
    inner = _embedded_ipv4(address)
    if inner is not None:
        problem = address_problem(inner)
        if problem:
            return f"{problem} (IPv4 {inner} inside IPv6)"
    row = special_range(address)
    if row is not None:
        if row.carries_ipv4 and inner is not None:
            return None  # judged by the public IPv4 address it carries
        return f"{row.name} ({row.rfc})"
    if isinstance(address, ipaddress.IPv6Address) and address not in _GLOBAL_UNICAST_V6:
        return "not global unicast (outside 2000::/3, RFC 4291 section 2.4)"
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
