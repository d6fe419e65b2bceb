"""Refuse URLs that point into the network the downloader runs in.

Scraped metadata is untrusted input: a row whose URL names (or resolves to) a loopback, private, link-local
or cloud-metadata address would make our cluster fetch from its own internal services (SSRF). Such rows are
refused before any request and counted under their own reason. The embedded default serves its images on
127.0.0.1, so it passes an explicit allow-list; nothing else changes between it and real metadata.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from functools import lru_cache
from urllib.parse import urlsplit

# Not covered by ipaddress' is_private / is_link_local on every Python version, or worth naming anyway.
CLOUD_METADATA_ADDRESSES = {
    ipaddress.ip_address("169.254.169.254"),  # AWS, GCP, Azure, OpenStack
    ipaddress.ip_address("fd00:ec2::254"),  # AWS IPv6
    ipaddress.ip_address("100.100.100.200"),  # Alibaba Cloud
}


def address_problem(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """Why an address is refused ("" when it is a public address)."""
    if address in CLOUD_METADATA_ADDRESSES:
        return "cloud_metadata_address"
    if address.is_loopback:
        return "loopback_address"
    if address.is_link_local:
        return "link_local_address"
    if address.is_private or address.is_reserved or address.is_unspecified or address.is_multicast:
        return "private_address"
    return ""


def system_resolver(host: str) -> list[str]:
    """All addresses a host name resolves to; [] when it does not resolve (that is a download failure)."""
    try:
        return sorted({info[4][0] for info in socket.getaddrinfo(host, None)})
    except (socket.gaierror, UnicodeError, OSError):
        return []


class AddressGuard:
    """`guard(url)` → "" to allow, or the reason the URL is refused. Host decisions are cached."""

    def __init__(
        self, allow_hosts: Iterable[str] = (), resolver: Callable[[str], list[str]] = system_resolver
    ):
        self.allow_hosts = {host.lower() for host in allow_hosts}
        self.resolver = resolver
        self._host_problem = lru_cache(maxsize=1_000_000)(self._problem_for_host)

    def __call__(self, url: str) -> str:
        try:
            host = urlsplit(url).hostname
        except ValueError:
            return ""  # malformed URLs are the URL filter's business
        if not host:
            return ""
        return self._host_problem(host.lower())

    def _problem_for_host(self, host: str) -> str:
        if host in self.allow_hosts:
            return ""
        if host == "localhost" or host.endswith(".localhost"):
            return "loopback_address"
        try:
            return address_problem(ipaddress.ip_address(host.strip("[]")))
        except ValueError:
            pass  # a name, not an address literal
        # A name that resolves inward is refused as well; any one inward address is enough.
        for text in self.resolver(host):
            problem = address_problem(ipaddress.ip_address(text.split("%")[0]))
            if problem:
                return problem
        return ""


def guarded_create_connection(allow_hosts: frozenset[str]):
    """A `socket.create_connection` that refuses inward peers at connect time, for every request including
    redirects, and connects to the very address it checked (so DNS rebinding cannot swap it afterwards)."""

    def create_connection(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None, **kwargs):
        host, port = address[0], address[1]
        if host.lower().strip("[]") in allow_hosts:
            return socket.create_connection(address, timeout, source_address, **kwargs)
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        for *_, peer in infos:
            ip = peer[0].split("%")[0]
            problem = "" if ip in allow_hosts else address_problem(ipaddress.ip_address(ip))
            if problem:
                raise OSError(f"refused by the address guard: {problem} ({host} resolves to {ip})")
        return socket.create_connection((infos[0][4][0], port), timeout, source_address, **kwargs)

    return create_connection


def install_guarded_opener(allow_hosts: Iterable[str]) -> None:
    """Make this process's urllib (which img2dataset downloads with) check every connection's peer."""
    import http.client
    import urllib.request

    # A configured proxy is where urllib connects: it must be reachable even on a private address; behind it,
    # the selection-time check of each URL's host is what remains.
    proxies = {urlsplit(url).hostname for url in urllib.request.getproxies().values() if "://" in url}
    allowed = {host.lower() for host in allow_hosts} | {host.lower() for host in proxies if host}
    connect = guarded_create_connection(frozenset(allowed))

    class GuardedHTTPConnection(http.client.HTTPConnection):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = connect

    class GuardedHTTPSConnection(http.client.HTTPSConnection):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = connect

    class GuardedHTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, request):
            return self.do_open(GuardedHTTPConnection, request)

    class GuardedHTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, request):
            return self.do_open(GuardedHTTPSConnection, request, context=self._context)

    urllib.request.install_opener(urllib.request.build_opener(GuardedHTTPHandler, GuardedHTTPSHandler))
