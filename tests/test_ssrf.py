"""The SSRF guard (agents/netguard.py): http steps cannot reach internal addresses unless allowed.

Real HTTP servers on 127.0.0.1 play both the "internal service" a step must not reach and the
allow-listed endpoint that redirects into it. Nothing here leaves the machine: refused
destinations (169.254.169.254, 10.0.0.1, ...) are refused before any packet is sent.
"""

from __future__ import annotations

import ipaddress
import socket

import pytest

from agents import netguard
from agents.registry import StepError
from tests.conftest import run_to_end
from tests.test_handlers_http import FakeServer, Reply, fail_http, run_http


def fresh_connections() -> None:
    """Drop this thread's pooled connections: the guard runs when a connection is opened."""
    from agents import httpclient

    httpclient._local.__dict__.clear()


@pytest.fixture
def no_allow(settings):
    """The production default: nothing allow-listed, no configured endpoints."""
    fresh_connections()
    settings.ORCHESTRATOR_HTTP_ALLOW_HOSTS = []
    settings.ORCHESTRATOR_AGENTS_BASE_URL = ""
    settings.ORCHESTRATOR_DATA_SERVICE_URL = ""
    settings.ORCHESTRATOR_LLM_BASE_URL = ""
    settings.ORCHESTRATOR_LLM_FALLBACK_URLS = []
    return settings


@pytest.fixture
def internal():
    """An "internal service" on loopback that must never see a request."""
    srv = FakeServer()
    yield srv
    srv.close()


@pytest.fixture
def front():
    """An allow-listed server (redirects into the internal one in some tests)."""
    srv = FakeServer()
    yield srv
    srv.close()


def port_of(server: FakeServer) -> int:
    return server.httpd.server_address[1]


@pytest.mark.parametrize(
    ("address", "reason"),
    [
        ("127.0.0.1", "loopback"),
        ("127.8.9.10", "loopback"),
        ("169.254.169.254", "link-local"),
        ("10.0.0.1", "private"),
        ("172.16.5.4", "private"),
        ("192.168.1.1", "private"),
        ("100.64.0.1", "shared address space"),
        ("0.0.0.0", "unspecified"),
        ("224.0.0.1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("192.0.0.192", "IETF protocol assignments"),  # ipaddress (3.11) calls it global
        ("192.0.0.9", "port control protocol anycast"),
        ("198.18.0.1", "benchmarking"),
        ("255.255.255.255", "limited broadcast"),
        ("2001:db8::1", "documentation"),
        ("3fff::1", "documentation"),
        ("2001:2::1", "benchmarking"),
        ("::7f00:1", "not global unicast"),  # deprecated IPv4-compatible form, outside 2000::/3
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fc00::1", "private"),
        ("::", "unspecified"),
        ("::ffff:127.0.0.1", "loopback"),
        ("::ffff:169.254.169.254", "link-local"),
        ("2002:7f00:1::", "loopback"),  # 6to4 wrapping 127.0.0.1
        ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 wrapping 169.254.169.254
    ],
)
def test_internal_addresses_are_refused(address, reason):
    problem = netguard.address_problem(ipaddress.ip_address(address))
    assert problem is not None and problem.startswith(reason)


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::"]
)
def test_public_addresses_pass(address):
    assert netguard.address_problem(ipaddress.ip_address(address)) is None


def _samples(network):
    """First, second, middle and last address of a network."""
    size = network.num_addresses
    return {network[0], network[min(1, size - 1)], network[size // 2], network[-1]}


@pytest.mark.parametrize("row", netguard.SPECIAL_PURPOSE, ids=lambda row: f"{row.network} {row.rfc}")
def test_every_special_purpose_range_is_refused(row):
    # Given one row of the IANA special-purpose tables, every address sampled from it is refused
    # with a reason naming a range and its RFC (carriers are judged by an embedded private IPv4)
    for address in _samples(row.network):
        if row.carries_ipv4:
            inner = ipaddress.IPv4Address("10.1.2.3")
            if row.network.prefixlen == 16:  # 6to4: the IPv4 address sits in bits 16..48
                address = ipaddress.IPv6Address(int(row.network[0]) | int(inner) << 80)
            else:
                address = ipaddress.IPv6Address(int(row.network[0]) | int(inner))
            assert netguard.address_problem(address).startswith("private"), address
            continue
        problem = netguard.address_problem(address)
        assert problem is not None, f"{address} ({row.name}) passed the guard"
        assert "RFC" in problem


def test_special_purpose_table_does_not_rely_on_is_global():
    # 192.0.0.192 is what Python 3.11's ipaddress calls global; the table still refuses it
    address = ipaddress.ip_address("192.0.0.192")
    assert netguard.special_range(address).rfc == "RFC 6890 section 2.1"


def test_http_step_to_special_purpose_address_is_refused(no_allow):
    error, _ = fail_http({"url": "http://192.0.0.192/"})
    assert error.permanent is True
    assert "refused to connect to 192.0.0.192" in error.message and "RFC 6890" in error.message


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:{port}/secret",
        "http://localhost:{port}/secret",  # a name that resolves to loopback
        "http://[::ffff:127.0.0.1]:{port}/secret",  # IPv4-mapped IPv6
        "http://2130706433:{port}/secret",  # 127.0.0.1 as one decimal number
        "http://0x7f.1:{port}/secret",  # and in the hex/short form inet_aton accepts
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata
        "http://10.0.0.1/admin",
        "http://[fd00::1]/",
    ],
)
def test_http_step_to_internal_destination_is_refused(no_allow, internal, url):
    # Given nothing allow-listed, when a step calls an internal address ...
    error, ctx = fail_http({"url": url.format(port=port_of(internal))})
    # ... it fails permanently (a retry cannot help), says why, and nothing was sent
    assert error.permanent is True
    assert "refused to connect" in error.message and "ORCHESTRATOR_HTTP_ALLOW_HOSTS" in error.message
    assert internal.requests == []
    assert ctx.events and "SSRF guard" in ctx.events[-1][1]
    print(f"refused: {url} -> {error.message}")


@pytest.mark.parametrize(
    "target",
    [
        "http://127.0.0.1:{port}/secret",
        "http://[::ffff:127.0.0.1]:{port}/secret",
        "http://169.254.169.254/latest/meta-data/iam/",
        "http://192.168.0.1/",
    ],
)
def test_redirect_into_internal_destination_is_refused(no_allow, internal, front, target):
    # Given an allow-listed server (exact host:port) that redirects into an internal address ...
    no_allow.ORCHESTRATOR_HTTP_ALLOW_HOSTS = [f"127.0.0.1:{port_of(front)}"]
    front.routes["/go"] = Reply(status=302, body="", headers={"Location": target.format(port=port_of(internal))})
    # ... a step that follows redirects reaches the first hop and is stopped at the second
    error, _ = fail_http({"url": front.url("/go"), "follow_redirects": True})
    assert error.permanent is True and "refused to connect" in error.message
    assert [r.path for r in front.requests] == ["/go"]
    assert internal.requests == []


def test_allow_list_lets_named_hosts_through(no_allow, internal):
    port = port_of(internal)
    for entry in ("127.0.0.1", f"127.0.0.1:{port}", "127.0.0.0/8", "localhost"):
        no_allow.ORCHESTRATOR_HTTP_ALLOW_HOSTS = [entry]
        host = "localhost" if entry == "localhost" else "127.0.0.1"
        output, _ = run_http({"url": f"http://{host}:{port}/ok"})
        assert output["status"] == 200, entry
    # a port-bound entry allows that port only
    fresh_connections()
    no_allow.ORCHESTRATOR_HTTP_ALLOW_HOSTS = [f"127.0.0.1:{port + 1 if port < 65535 else port - 1}"]
    error, _ = fail_http({"url": internal.url("/ok")})
    assert error.permanent and "loopback" in error.message
    assert len(internal.requests) == 4


def test_configured_agent_origin_is_allowed_but_not_its_neighbours(no_allow, internal, front):
    # Given the operator's agents base URL on loopback (no allow-list entry) ...
    no_allow.ORCHESTRATOR_AGENTS_BASE_URL = front.base
    # ... `call` steps reach it, and so does a url step to that exact origin ...
    assert run_http({"call": "/functions/v1/agent", "json": {}})[0]["status"] == 200
    assert run_http({"url": front.url("/x")})[0]["status"] == 200
    # ... but another port of the same host stays refused
    error, _ = fail_http({"url": internal.url("/secret")})
    assert error.permanent and internal.requests == []


def test_a_name_with_any_internal_address_is_refused(no_allow, monkeypatch):
    # A name answering with one public and one internal address could reach either: refused.
    def fake_getaddrinfo(host, port, *args, **kwargs):
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.215.14", port)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("169.254.169.254", port)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", fake_getaddrinfo)
    with pytest.raises(netguard.BlockedAddress, match="169.254.169.254"):
        netguard.check_host("metadata.example", 80)
    # the addresses handed to connect are the ones checked (the socket is pinned to them)
    assert netguard.check_host("public.example", 80, ["93.184.215.14"]) == ["93.184.215.14"]


@pytest.mark.parametrize("entry", ["a b", "host:99999", "[::1]x", "http://x/"])
def test_malformed_allow_list_entry_is_an_error(no_allow, entry):
    no_allow.ORCHESTRATOR_HTTP_ALLOW_HOSTS = [entry]
    with pytest.raises(ValueError):
        netguard.allow_list()


def test_refused_step_in_a_run_fails_without_retry(worker):
    # Through the real worker (whose allow-list has only the tests' loopback servers) ...
    run, steps = run_to_end(
        "key: ssrf\nsteps:\n  - id: meta\n    type: http\n"
        "    params: {url: 'http://169.254.169.254/latest/meta-data/'}\n"
        "    retry: {max_attempts: 3, initial_delay: 0.1}\n"
    )
    # ... the metadata call is refused once, permanently: no retries
    assert run.status == "failed"
    assert steps["meta"].status == "failed" and steps["meta"].attempts == 1
    assert "link-local" in steps["meta"].error


def test_blocked_address_is_a_step_error_not_a_crash(no_allow):
    error, _ = fail_http({"url": "http://[::1]:1/"})
    assert isinstance(error, StepError) and "loopback" in error.message
