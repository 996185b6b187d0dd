"""Which IP addresses a fetch may connect to (the SSRF guard).

A user-supplied URL must not reach the worker's own network: loopback, private ranges, link-local (the cloud
metadata service at 169.254.169.254), multicast, reserved space, or any IPv6 form that embeds one of those.
Everything special-purpose is blocked unless an operator allows its network (``IMGQ_ALLOW_NETWORKS``).

Three entry points:

* :func:`is_blocked` decides for one address.
* :func:`parse_ip_host` reads a URL host that is an IP address in any spelling ``inet_aton`` accepts
  (``2130706433``, ``0x7f000001``, ``0177.0.0.1``, ``127.1``), so those spellings are checked like the dotted form.
* :class:`GuardedResolver` is the aiohttp resolver: it resolves a name once, refuses if *any* answer is blocked,
  and hands aiohttp exactly the addresses it checked, so the connection goes where the check looked (no DNS
  rebinding between check and connect). aiohttp never calls a resolver for IP-literal hosts, so the fetcher
  checks those itself with :func:`check_host` before connecting.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Sequence

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import ThreadedResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# IANA special-purpose registries, spelled out so the answer does not depend on the Python patch release
# (ipaddress.is_private changed in 3.11.10/3.12.4). The ipaddress flags are consulted as well.
_BLOCKED_NETWORKS: tuple[IPNetwork, ...] = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",  # "this network"; connecting to 0.0.0.0 reaches the local host on Linux
        "10.0.0.0/8",
        "100.64.0.0/10",  # shared address space (carrier-grade NAT)
        "127.0.0.0/8",
        "169.254.0.0/16",  # link-local, including the 169.254.169.254 metadata service
        "172.16.0.0/12",
        "192.0.0.0/24",  # IETF protocol assignments
        "192.0.2.0/24",  # TEST-NET-1
        "192.88.99.0/24",  # 6to4 relay anycast
        "192.168.0.0/16",
        "198.18.0.0/15",  # benchmarking
        "198.51.100.0/24",  # TEST-NET-2
        "203.0.113.0/24",  # TEST-NET-3
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, including 255.255.255.255
        "::/128",
        "::1/128",
        "64:ff9b:1::/48",  # local-use NAT64
        "100::/64",  # discard-only
        "2001::/23",  # IETF protocol assignments, including Teredo 2001::/32
        "2001:db8::/32",  # documentation
        "3fff::/20",  # documentation
        "5f00::/16",  # SRv6 SIDs
        "fc00::/7",  # unique local
        "fe80::/10",  # link-local
        "fec0::/10",  # site-local (deprecated, still routed by some stacks)
        "ff00::/8",  # multicast
    )
)

# IPv6 prefixes whose last 32 bits (or bits 16-48 for 6to4) name an IPv4 host the packet really goes to:
# such an address is exactly as blocked as the IPv4 address inside it.
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class BlockedAddressError(Exception):
    """A host resolved to a blocked address.

    Deliberately not an ``OSError``: aiohttp wraps resolver ``OSError`` s as DNS failures, and this must reach
    the fetcher as itself so it becomes ``blocked_address``, not ``unreachable``.
    """

    def __init__(self, host: str, address: IPAddress) -> None:
        super().__init__(f"{host} resolves to {address}")
        self.host = host
        self.address = address


def parse_allow(networks: Sequence[str]) -> tuple[IPNetwork, ...]:
    """The allow-list from settings (already validated there)."""
    return tuple(ipaddress.ip_network(n, strict=False) for n in networks)


def embedded_ipv4(ip: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 host an IPv4-mapped, IPv4-compatible, NAT64 or 6to4 address actually reaches."""
    if isinstance(ip, ipaddress.IPv4Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    plain = ipaddress.IPv6Address(int(ip))  # drop any %scope before the prefix tests
    if plain in _NAT64 or (plain in _IPV4_COMPATIBLE and int(plain) > 1):
        return ipaddress.IPv4Address(int(plain) & 0xFFFFFFFF)
    return None


def _allowed(ip: IPAddress, allow: Sequence[IPNetwork]) -> bool:
    # `in` is False across IP versions, so a mixed allow-list needs no special casing.
    return any(ip in net for net in allow)


def _special(ip: IPAddress) -> bool:
    if any(ip in net for net in _BLOCKED_NETWORKS):
        return True
    flags = (ip.is_private, ip.is_loopback, ip.is_link_local, ip.is_multicast, ip.is_reserved, ip.is_unspecified)
    site_local = isinstance(ip, ipaddress.IPv6Address) and ip.is_site_local
    return any(flags) or site_local or not ip.is_global


def is_blocked(ip: IPAddress, allow: Sequence[IPNetwork]) -> bool:
    """True when a fetch must not connect to ``ip``: it is special-purpose and not inside ``allow``."""
    if _allowed(ip, allow):
        return False
    inner = embedded_ipv4(ip)
    if inner is not None:
        return is_blocked(inner, allow)
    return _special(ip)


_HEX = re.compile(r"0[xX][0-9a-fA-F]*", re.ASCII)
_OCTAL = re.compile(r"0[0-7]+", re.ASCII)
_DECIMAL = re.compile(r"0|[1-9][0-9]*", re.ASCII)


def _parse_ipv4_part(part: str) -> int | None:
    """One inet_aton component: 0x.. hex, 0.. octal, else decimal; None if it is not a number."""
    if _HEX.fullmatch(part):
        return int(part[2:] or "0", 16)
    if _OCTAL.fullmatch(part):
        return int(part, 8)
    if _DECIMAL.fullmatch(part):
        return int(part)
    return None


def parse_ipv4_host(host: str) -> ipaddress.IPv4Address | None:
    """An IPv4 address in any spelling ``inet_aton``/getaddrinfo accept, or None when ``host`` is a name.

    ``127.1`` is 127.0.0.1 (the last part fills the remaining bytes), ``2130706433`` and ``0x7f000001`` are
    one 32-bit number, ``0177.0.0.1`` is octal. Raises ValueError for a numeric host that is out of range.
    """
    parts = host.removesuffix(".").split(".")
    if not 1 <= len(parts) <= 4 or "" in parts:
        return None
    parsed = [_parse_ipv4_part(p) for p in parts]
    numbers = [n for n in parsed if n is not None]
    if len(numbers) != len(parsed):
        return None  # a name such as example.com: DNS decides, and the resolver checks the answer
    *head, last = numbers
    if any(n > 0xFF for n in head) or last >= 1 << (8 * (5 - len(numbers))):
        raise ValueError(f"{host!r} is a numeric IPv4 address out of range")
    value = last
    for i, n in enumerate(head):
        value |= n << (8 * (3 - i))
    return ipaddress.IPv4Address(value)


def parse_ip_host(host: str) -> IPAddress | None:
    """The address an IP-literal URL host names (IPv6 without brackets, IPv4 in any spelling), else None."""
    if ":" in host:
        return ipaddress.IPv6Address(host.strip("[]"))
    return parse_ipv4_host(host)


def blocked_message(host: str, ip: IPAddress) -> str:
    shown = host if host == str(ip) else f"{host} ({ip})"
    plain = ip if isinstance(ip, ipaddress.IPv4Address) else ipaddress.IPv6Address(int(ip))  # no %zone
    return (
        f"{shown} is a private, loopback, link-local or otherwise reserved address, which imgq does not fetch "
        f"from by default. To allow it, set IMGQ_ALLOW_NETWORKS (or pass --allow-network) to a network that "
        f"contains it, e.g. {plain}/{plain.max_prefixlen}"
    )


class GuardedResolver(AbstractResolver):
    """aiohttp resolver that refuses hosts with any blocked address and returns only checked addresses."""

    def __init__(self, allow: Sequence[IPNetwork]) -> None:
        # ThreadedResolver binds the running loop: construct this inside the loop that will use it.
        self._inner = ThreadedResolver()
        self._allow = tuple(allow)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        for result in results:
            ip = ipaddress.ip_address(result["host"])
            # One bad answer refuses the host: with several A records a later connection attempt (or a
            # rebinding server) could otherwise land on the private one.
            if is_blocked(ip, self._allow):
                raise BlockedAddressError(host, ip)
        return results

    async def close(self) -> None:
        await self._inner.close()
