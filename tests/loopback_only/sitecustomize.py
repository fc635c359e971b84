"""Loopback only: every Python process of the test suite refuses non-loopback network peers.

The tests and benchmarks may talk only to 127.0.0.0/8 and ::1. tests/conftest.py
installs this guard in pytest itself and puts this directory first on
PYTHONPATH, so that every Python subprocess a test starts (the CLI, the daemon,
its workers) imports it as ``sitecustomize`` at start-up. A name lookup other
than ``localhost``, or a connect/sendto to any other address, raises at once
instead of leaving the machine; each refusal is also appended to the file
named by ``LOOPBACK_GUARD_LOG``, so that conftest fails the test during which
any process tried (even one that only logged the error).
"""

from __future__ import annotations

import ipaddress
import os
import socket
from typing import Any

_ALLOWED_NAMES = {"localhost", "localhost.", "ip6-localhost", "ip6-loopback"}


def allowed(host: Any) -> bool:
    """Loopback, the unspecified address (binding), or a local socket path."""
    if host is None or isinstance(host, bytes | bytearray):
        return host is None or bytes(host).decode(errors="replace").lower() in _ALLOWED_NAMES
    text = str(host).strip("[]").split("%", 1)[0].lower()
    if text in _ALLOWED_NAMES or text == "":
        return True
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified or (
        isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None
        and address.ipv4_mapped.is_loopback)


def _refused(what: str) -> str:
    path = os.environ.get("LOOPBACK_GUARD_LOG")
    if path:
        with open(path, "a") as log:
            log.write(f"pid {os.getpid()}: {what}\n")
    return f"test sandbox: {what}"


def _check(address: Any) -> None:
    if isinstance(address, tuple) and address and not allowed(address[0]):
        raise ConnectionRefusedError(_refused(f"{address[0]!r} is not a loopback address"))


def install() -> None:
    if getattr(socket, "_loopback_only", False):
        return
    real_getaddrinfo = socket.getaddrinfo
    real_connect, real_connect_ex, real_sendto = socket.socket.connect, socket.socket.connect_ex, socket.socket.sendto

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not allowed(host):
            raise socket.gaierror(socket.EAI_NONAME, _refused(f"no lookup of {host!r} (not loopback)"))
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(self: socket.socket, address: Any) -> Any:
        _check(address)
        return real_connect(self, address)

    def connect_ex(self: socket.socket, address: Any) -> Any:
        _check(address)
        return real_connect_ex(self, address)

    def sendto(self: socket.socket, data: Any, *args: Any) -> Any:
        _check(args[-1])
        return real_sendto(self, data, *args)

    socket.getaddrinfo = getaddrinfo  # type: ignore[assignment]
    socket.socket.connect = connect  # type: ignore[method-assign]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign]
    socket.socket.sendto = sendto  # type: ignore[method-assign]
    socket._loopback_only = True  # type: ignore[attr-defined]


install()
