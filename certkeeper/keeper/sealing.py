"""Sealing DKIM private keys for the fleet's shared store (``[fleet] secret_file``), on the keeper's side.

A fleet of MX hosts signs with the same DKIM keys; the rotator's keeper seals
a new private key, the unprivileged network worker carries the ciphertext to
etcd and the other hosts' workers bring it back to their keepers, which open
it and write the key file. Only the keepers (root) read ``secret_file``; the
network side and etcd only ever see ciphertext.

AEAD: AES-256-GCM (``cryptography``) under a key derived from ``secret_file``
with HKDF-SHA256; a fresh 96-bit nonce per seal; the associated data binds the
ciphertext to its domain, selector and algorithm, so a ciphertext cannot be
installed as another selector's key. Sealed text: ``v1:`` + base64(nonce ||
ciphertext || tag).
"""

from __future__ import annotations

import base64
import binascii
import os
import stat
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from certkeeper.core.errors import LocalError

VERSION = "v1:"
MIN_SECRET = 32  # bytes in secret_file
INFO = b"certkeeper fleet DKIM private keys v1"


def fleet_key(secret_file: Path) -> bytes:
    """The AEAD key derived from ``secret_file``; LocalError (one line naming the file) when it is unusable."""
    try:
        fd = os.open(secret_file, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as exc:
        raise LocalError(f"[fleet] secret_file {secret_file}: cannot read: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise LocalError(f"[fleet] secret_file {secret_file}: not a regular file")
        if info.st_mode & 0o077:
            raise LocalError(f"[fleet] secret_file {secret_file}: mode {info.st_mode & 0o777:04o} lets others read "
                             "it; use 0600 or 0400")
        data = os.read(fd, 1 << 16)
    finally:
        os.close(fd)
    if len(data.strip()) < MIN_SECRET:
        raise LocalError(f"[fleet] secret_file {secret_file}: holds {len(data.strip())} bytes; "
                         f"use {MIN_SECRET} random bytes or more (e.g. openssl rand -base64 48)")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=INFO).derive(data.strip())


def _associated(domain: str, selector: str, algorithm: str) -> bytes:
    return f"dkim\0{domain}\0{selector}\0{algorithm}".encode()


def seal(key: bytes, domain: str, selector: str, algorithm: str, private_key_file: bytes) -> str:
    nonce = os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, private_key_file, _associated(domain, selector, algorithm))
    return VERSION + base64.b64encode(nonce + sealed).decode()


def open_sealed(key: bytes, domain: str, selector: str, algorithm: str, text: str) -> bytes:
    """The private key file sealed in ``text``; LocalError when it is not one this fleet sealed for that selector."""
    if not text.startswith(VERSION):
        raise LocalError(f"dkim {domain}: the sealed key of selector {selector} is not in a known format")
    try:
        raw = base64.b64decode(text[len(VERSION):], validate=True)
    except (binascii.Error, ValueError):
        raise LocalError(f"dkim {domain}: the sealed key of selector {selector} is not base64") from None
    if len(raw) < 12 + 16:
        raise LocalError(f"dkim {domain}: the sealed key of selector {selector} is truncated")
    try:
        return AESGCM(key).decrypt(raw[:12], raw[12:], _associated(domain, selector, algorithm))
    except InvalidTag:
        raise LocalError(f"dkim {domain}: the sealed key of selector {selector} does not open with "
                         "[fleet] secret_file (another fleet's secret, or altered in the store)") from None
