"""The image-URL guard's address judgement, IPv6 embeddings of IPv4 included (no sockets)."""

from __future__ import annotations

import ipaddress

import pytest

from diffserve.scheduler.images import ImageRefused, check_address, embedded_ipv4, is_public

REFUSED = [
    "::127.0.0.1",  # IPv4-compatible loopback
    "::10.0.0.1",
    "::ffff:127.0.0.1",  # IPv4-mapped
    "::ffff:169.254.169.254",
    "::ffff:192.168.1.1",
    "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
    "64:ff9b::a00:1",  # NAT64 of 10.0.0.1
    "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
    "64:ff9b:1::808:808",  # local-use NAT64 (RFC 8215): never global
    "2002:7f00:1::",  # 6to4 of 127.0.0.1
    "2002:c0a8:101::1",  # 6to4 of 192.168.1.1
    "2002:a9fe:a9fe::1",
    "2001:0:4136:e378:8000:63bf:80ff:fffe",  # Teredo, client 127.0.0.1 (obfuscated)
    "::1", "::", "fe80::1", "fc00::1", "127.0.0.1", "10.1.2.3", "169.254.169.254", "0.0.0.0", "100.64.0.1",
]
ALLOWED = ["8.8.8.8", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808", "2002:808:808::1"]


@pytest.mark.parametrize("address", REFUSED)
def test_refused(address):
    assert not is_public(ipaddress.ip_address(address))
    with pytest.raises(ImageRefused, match="private, loopback"):
        check_address(address, 80, allow_private=False)  # a literal: getaddrinfo does no lookup
    assert check_address(address, 80, allow_private=True) == address


@pytest.mark.parametrize("address", ALLOWED)
def test_allowed(address):
    assert is_public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address,inner", [
    ("::127.0.0.1", "127.0.0.1"), ("::ffff:127.0.0.1", "127.0.0.1"), ("64:ff9b::7f00:1", "127.0.0.1"),
    ("2002:7f00:1::", "127.0.0.1"), ("2606:4700:4700::1111", None), ("8.8.8.8", None),
])
def test_embedded_ipv4(address, inner):
    found = embedded_ipv4(ipaddress.ip_address(address))
    assert (str(found) if found else None) == inner
