"""Fetching a client-given image URL without becoming a proxy into the private network (SSRF).

Every connection, the first and each redirect's, goes through ``GuardedBackend``: the host name
is resolved once, *every* address it resolves to must be public (not loopback, private,
link-local, cloud metadata, CGNAT, multicast or reserved, also when embedded in IPv6 forms),
and the socket then connects to one of exactly those addresses, so a DNS answer that changes
between the check and the connect (rebinding) cannot slip through. TLS still verifies the
certificate against the host name. Redirects are followed by hand, up to a limit, each URL
checked again. The body is read in chunks up to a byte limit and a deadline; no proxy from the
environment is used and no content encoding is undone.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final
from urllib.parse import urljoin, urlsplit

import httpcore

from service.errors import UrlFetchError

log = logging.getLogger(__name__)

Resolver = Callable[[str, int], Sequence[str]]
AddressPolicy = Callable[[str], bool]

_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
_BLOCKED_NAMES: Final = frozenset(
    {"localhost", "metadata", "metadata.google.internal", "metadata.goog", "instance-data"}
)
_NAT64: Final = ipaddress.ip_network("64:ff9b::/96")
_IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped, 6to4, Teredo, NAT64), if any."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def is_public_address(text: str) -> bool:
    """True when ``text`` is a globally routable unicast address a fetch may connect to."""
    try:
        address: _IP = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        inner = _embedded_ipv4(address)
        if inner is not None and not is_public_address(str(inner)):
            return False
    return bool(
        address.is_global
        and not address.is_multicast
        and not address.is_reserved
        and not address.is_loopback
        and not address.is_link_local
        and not address.is_private
        and not address.is_unspecified
    )


def resolve(host: str, port: int) -> Sequence[str]:
    """Every address ``host`` resolves to (IPv4 and IPv6), in the resolver's order."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UrlFetchError("unreachable", f"cannot resolve {host!r}: {exc}") from exc
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class GuardedBackend(httpcore.NetworkBackend):
    """An httpcore backend that connects only to addresses ``allow`` accepts."""

    def __init__(self, allow: AddressPolicy, resolver: Resolver) -> None:
        self._allow = allow
        self._resolve = resolver
        self._inner = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        if host.lower().rstrip(".") in _BLOCKED_NAMES:
            raise UrlFetchError("forbidden_address", f"{host} is not a public host")
        addresses = self._resolve(host, port)
        refused = [a for a in addresses if not self._allow(a)]
        if not addresses or refused:
            raise UrlFetchError(
                "forbidden_address",
                f"{host} resolves to a non-public address; only public hosts can be fetched",
            )
        error: Exception | None = None
        for address in addresses:
            try:
                return self._inner.connect_tcp(
                    address, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                error = exc
        raise UrlFetchError("unreachable", f"cannot connect to {host}:{port}: {error}")

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.NetworkStream:
        raise UrlFetchError("forbidden_address", "unix sockets cannot be fetched")

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


@dataclass(frozen=True)
class FetchLimits:
    max_bytes: int
    timeout_s: float = 10.0
    max_redirects: int = 3


def check_url(url: str) -> str:
    """Return ``url`` if it is an absolute http(s) URL without credentials; else ``bad_url``."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UrlFetchError("bad_url", f"not a valid URL: {exc}") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UrlFetchError("bad_url", "only absolute http and https URLs can be fetched")
    if parts.username is not None or parts.password is not None:
        raise UrlFetchError("bad_url", "URLs with credentials are refused")
    if port == 0:
        raise UrlFetchError("bad_url", "port 0 is refused")
    try:
        parts.hostname.encode("idna")
    except UnicodeError as exc:
        raise UrlFetchError("bad_url", f"bad host name: {exc}") from exc
    return url


class SafeFetcher:
    """Fetch image bytes from public URLs only. Blocking: call it from a worker thread."""

    def __init__(
        self,
        limits: FetchLimits,
        *,
        allow: AddressPolicy = is_public_address,
        resolver: Resolver = resolve,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits
        self._backend = GuardedBackend(allow, resolver)
        self._clock = clock

    def fetch(self, url: str) -> bytes:
        """The body of ``url`` after at most ``max_redirects`` redirects; ``UrlFetchError`` else."""
        deadline = self._clock() + self.limits.timeout_s
        for _ in range(self.limits.max_redirects + 1):
            check_url(url)
            try:
                status, location, body = self._get(url, deadline)
            except httpcore.TimeoutException as exc:
                raise UrlFetchError("timeout", f"fetching the image timed out: {exc}") from exc
            except (
                httpcore.NetworkError,
                httpcore.ProtocolError,
                httpcore.UnsupportedProtocol,
            ) as exc:
                raise UrlFetchError("unreachable", f"fetching the image failed: {exc}") from exc
            if status in _REDIRECTS:
                if not location:
                    raise UrlFetchError("http_error", f"redirect {status} without a Location")
                url = urljoin(url, location)
                continue
            if status != 200 or body is None:
                raise UrlFetchError("http_error", f"the image URL answered HTTP {status}")
            return body
        raise UrlFetchError(
            "too_many_redirects", f"more than {self.limits.max_redirects} redirects"
        )

    def _get(self, url: str, deadline: float) -> tuple[int, str | None, bytes | None]:
        remaining = max(0.1, deadline - self._clock())
        timeouts = {"connect": remaining, "read": remaining, "write": remaining, "pool": remaining}
        headers = [
            (b"User-Agent", b"lookalike"),
            (b"Accept", b"image/*"),
            (b"Accept-Encoding", b"identity"),
        ]
        with (
            httpcore.ConnectionPool(network_backend=self._backend, retries=0) as pool,
            pool.stream("GET", url, headers=headers, extensions={"timeout": timeouts}) as response,
        ):
            if response.status in _REDIRECTS:
                return response.status, _header(response.headers, b"location"), None
            if response.status != 200:
                return response.status, None, None
            declared = _header(response.headers, b"content-length")
            if (
                declared is not None
                and declared.isdigit()
                and int(declared) > self.limits.max_bytes
            ):
                raise UrlFetchError("too_large", f"the image is over {self.limits.max_bytes} bytes")
            chunks: list[bytes] = []
            size = 0
            for chunk in response.iter_stream():
                size += len(chunk)
                if size > self.limits.max_bytes:
                    raise UrlFetchError(
                        "too_large", f"the image is over {self.limits.max_bytes} bytes"
                    )
                if self._clock() > deadline:
                    raise UrlFetchError("timeout", "fetching the image took too long")
                chunks.append(chunk)
            return 200, None, b"".join(chunks)


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None
