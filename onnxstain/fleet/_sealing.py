"""Sealing of key bytes with a passphrase: AES-256-GCM, the key derived with scrypt.

An encrypted registry stores a salt, the scrypt parameters and a verifier (a known token sealed with the
derived key) in its ``meta`` table: :func:`_sealing_meta` makes them for a new registry, :func:`_unlock`
checks a passphrase against them. Each sealed blob is bound (as associated data, :func:`_aad`) to what it is
and to its copy's key commitment. The ``cryptography`` package is imported only when a registry is encrypted
(``pip install 'onnxstain[fleet]'``).
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import BadInputError
from ._schema import _db_errors, _text

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**15, 8, 1
PASSPHRASE_HINT = "pip install 'onnxstain[fleet]'"

_SEALED = b"OSRK1"  # an encrypted key blob: this marker, a 12-byte nonce, then the AES-GCM ciphertext
_VERIFIER_TOKEN = b"onnxstain-registry passphrase verifier v1"


class _Sealer:
    """AES-256-GCM with a key derived by scrypt; each blob bound (as associated data) to what it belongs to."""

    def __init__(self, passphrase: str, salt: bytes) -> None:
        aesgcm, scrypt = _crypto()
        key = scrypt(salt=salt, length=32, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(passphrase.encode())
        self._aead: AESGCM = aesgcm(key)

    def seal(self, data: bytes, aad: bytes) -> bytes:
        nonce = os.urandom(12)
        return _SEALED + nonce + self._aead.encrypt(nonce, data, aad)

    def open(self, blob: bytes, aad: bytes) -> bytes | None:
        """The plaintext, or None if the blob was not sealed with this key and ``aad`` (or was altered)."""
        from cryptography.exceptions import InvalidTag

        if not blob.startswith(_SEALED) or len(blob) < len(_SEALED) + 12 + 16:
            return None
        nonce, body = blob[len(_SEALED):len(_SEALED) + 12], blob[len(_SEALED) + 12:]
        try:
            return self._aead.decrypt(nonce, body, aad)
        except InvalidTag:
            return None


def _crypto() -> tuple[Any, Any]:
    """The AES-GCM and scrypt classes, imported only when a registry is encrypted."""
    try:
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.scrypt import Scrypt
    except ImportError:
        raise BadInputError("an encrypted registry needs the cryptography package: "
                            f"{PASSPHRASE_HINT}") from None
    return AESGCM, Scrypt


def _aad(what: str, key_commitment: str) -> bytes:
    # binds a blob to what it is and to its copy's commitment: blobs swapped between rows or columns do not decrypt
    return f"onnxstain-registry {what}\0{key_commitment}".encode()


def _sealing_meta(passphrase: str | None) -> dict[str, Any]:
    """What a new registry records to be encrypted with ``passphrase``: the key derivation, a fresh salt and a
    passphrase verifier (nothing without a passphrase)."""
    meta: dict[str, Any] = {}
    if passphrase is not None:
        salt = os.urandom(16)
        meta["kdf"] = json.dumps({"name": "scrypt", "n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P})
        meta["kdf_salt"] = salt
        meta["verifier"] = _Sealer(passphrase, salt).seal(_VERIFIER_TOKEN, b"verifier")
    return meta


def _unlock(conn: sqlite3.Connection, p: Path, passphrase: str | None) -> tuple[bool, _Sealer | None]:
    """(encrypted?, the sealer when the passphrase was given and is right)."""
    with _db_errors(p):
        meta = dict(conn.execute("SELECT key, value FROM meta WHERE key IN ('kdf', 'kdf_salt', 'verifier')"))
    if "kdf_salt" not in meta:
        if passphrase is not None:
            raise BadInputError(f"registry {p} is not encrypted: open it without a passphrase")
        return False, None
    if passphrase is None:
        return True, None
    kdf = json.loads(_text(meta.get("kdf")) or "{}")
    if (kdf.get("name"), kdf.get("n"), kdf.get("r"), kdf.get("p")) != ("scrypt", SCRYPT_N, SCRYPT_R, SCRYPT_P):
        raise BadInputError(f"registry {p} uses key derivation {kdf}, which this onnxstain does not know")
    sealer = _Sealer(passphrase, bytes(meta["kdf_salt"]))
    if sealer.open(bytes(meta.get("verifier") or b""), b"verifier") != _VERIFIER_TOKEN:
        raise BadInputError(f"wrong passphrase for registry {p}")
    return True, sealer
