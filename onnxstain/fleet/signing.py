"""Signing what ships: each issued copy signed with model-signing (a local elliptic-curve key pair, no network),
and its public record as a signed in-toto statement that binds the copy's SHA-256 to its key's commitment.

* ``<copy>.onnx.sig`` — model-signing's bundle (a sigstore bundle whose DSSE envelope carries an in-toto
  statement of the model's digest), verifiable with model-signing's own verifier:
  ``model_signing verify key <copy>.onnx --signature <copy>.onnx.sig --public_key vendor.pub``.
* ``<copy>.onnx.intoto.json`` — a DSSE envelope (payload type ``application/vnd.in-toto+json``) of an in-toto
  v1 statement: subject the copy and its SHA-256, predicate the key commitment, the source model's SHA-256, the
  false-positive bound, the tool; signed ECDSA P-256/SHA-256 with the same key. It reveals nothing of the key
  (the commitment hashes it with a secret nonce); publishing it timestamps the claim.

Key pairs: :func:`generate_key_pair`, or ``openssl ecparam -name prime256v1 -genkey -noout -out vendor.pem`` and
``openssl ec -in vendor.pem -pubout -out vendor.pub``. Both files are PEM.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from pathlib import Path
from typing import Any

from .._onnx.io import write_bytes_atomic
from ..errors import BadInputError

SIGNATURE_SUFFIX = ".sig"
STATEMENT_SUFFIX = ".intoto.json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://github.com/onnxstain/onnxstain/issued-copy/v1"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
HINT = "pip install 'onnxstain[fleet]'"


def _model_signing() -> Any:
    try:
        import model_signing
    except ImportError as e:  # model-signing itself, or a module it imports without declaring it (pyOpenSSL)
        missing = f" (missing: {e.name})" if e.name and not e.name.startswith("model_signing") else ""
        raise BadInputError(f"signing needs model-signing{missing}: {HINT}") from None
    return model_signing


def generate_key_pair(private: str | Path, public: str | Path) -> None:
    """A new P-256 key pair as PEM: the private key owner-only (0600), the public key world-readable."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    write_bytes_atomic(private, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()), mode=0o600)
    write_bytes_atomic(public, key.public_key().public_bytes(serialization.Encoding.PEM,
                                                             serialization.PublicFormat.SubjectPublicKeyInfo),
                       mode=0o644)


def _pem_key(path: str | Path, private: bool) -> Any:
    """An elliptic-curve key from a PEM file (private: unencrypted), else one line naming the problem."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    what = "private key" if private else "public key"
    try:
        data = Path(path).read_bytes()
        key = (serialization.load_pem_private_key(data, password=None) if private
               else serialization.load_pem_public_key(data))
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such {what}") from None
    except (ValueError, TypeError) as exc:
        raise BadInputError(f"{path} is not an unencrypted PEM {what} ({exc})") from None
    kind = ec.EllipticCurvePrivateKey if private else ec.EllipticCurvePublicKey
    if not isinstance(key, kind):
        raise BadInputError(f"{path} is not an elliptic-curve {what} (model-signing signs with P-256 keys)")
    return key


def check_signing_key(path: str | Path) -> None:
    """Refuse a missing or unusable key before any copy is made."""
    _pem_key(path, private=True)
    _model_signing()


def model_signature(model: str | Path, private_key: str | Path) -> bytes:
    """model-signing's bundle for the model file (written beside it, read back, removed)."""
    ms = _model_signing()
    sig = Path(f"{model}{SIGNATURE_SUFFIX}")
    ms.signing.Config().use_elliptic_key_signer(private_key=str(private_key)).sign(str(model), str(sig))
    try:
        return sig.read_bytes()
    finally:
        sig.unlink()


def _pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE's pre-authentication encoding."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


@dataclasses.dataclass(frozen=True)
class CopyClaim:
    """What the public statement says of one copy."""

    name: str
    model_sha256: str
    key_commitment: str
    source_sha256: str
    bound_log10: float | None
    tool: str


def statement(claim: CopyClaim, private_key: str | Path) -> bytes:
    """The signed in-toto statement (a DSSE envelope, JSON) binding the copy's hash to its key commitment."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    body = {"_type": STATEMENT_TYPE, "subject": [{"name": claim.name, "digest": {"sha256": claim.model_sha256}}],
            "predicateType": PREDICATE_TYPE,
            "predicate": {"key_commitment": claim.key_commitment, "source_model_sha256": claim.source_sha256,
                          "fpr_bound_log10": claim.bound_log10, "tool": claim.tool,
                          "commitment_method": "sha256 of the key's canonical JSON, which contains a secret "
                                               "256-bit nonce"}}
    payload = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    sig = _pem_key(private_key, private=True).sign(_pae(PAYLOAD_TYPE, payload), ec.ECDSA(hashes.SHA256()))
    envelope = {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(payload).decode(),
                "signatures": [{"keyid": "", "sig": base64.b64encode(sig).decode()}]}
    return json.dumps(envelope, indent=2).encode() + b"\n"


@dataclasses.dataclass(frozen=True)
class SignatureCheck:
    """What the signatures beside a model say: ``present`` files, and whether each verified (None: no key)."""

    model_signature: bool | None
    statement: bool | None
    present: tuple[str, ...]
    detail: str


def check_signatures(model: str | Path, public_key: str | Path | None,
                     key_commitment: str | None = None) -> SignatureCheck | None:
    """The signature and statement beside ``model``, checked with ``public_key`` (None when neither exists). A
    statement is valid when its signature verifies, its subject digest is the model's, and (given) its
    commitment is ``key_commitment``."""
    from .._onnx.io import sha256_file

    sig, stmt = Path(f"{model}{SIGNATURE_SUFFIX}"), Path(f"{model}{STATEMENT_SUFFIX}")
    present = tuple(p.name for p in (sig, stmt) if p.is_file())
    if not present:
        return None
    if public_key is None:
        return SignatureCheck(None, None, present, f"signed ({', '.join(present)}); pass --signer-key to check")
    model_ok: bool | None = None
    if sig.is_file():
        ms = _model_signing()
        try:
            ms.verifying.Config().use_elliptic_key_verifier(public_key=str(public_key)).verify(str(model), str(sig))
            model_ok = True
        except Exception:  # model-signing raises ValueError on a mismatch and assorted errors on a bad bundle
            model_ok = False
    stmt_ok: bool | None = None
    if stmt.is_file():
        stmt_ok = _statement_ok(stmt, public_key, sha256_file(model), key_commitment)
    parts = [f"{name}: {'valid' if ok else 'INVALID'}" for name, ok in
             ((sig.name, model_ok), (stmt.name, stmt_ok)) if ok is not None]
    return SignatureCheck(model_ok, stmt_ok, present, "; ".join(parts))


def _statement_ok(path: Path, public_key: str | Path, model_sha256: str, key_commitment: str | None) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        env = json.loads(path.read_bytes())
        payload = base64.b64decode(env["payload"])
        sig = base64.b64decode(env["signatures"][0]["sig"])
        _pem_key(public_key, private=False).verify(sig, _pae(env["payloadType"], payload), ec.ECDSA(hashes.SHA256()))
        body = json.loads(payload)
    except (InvalidSignature, ValueError, KeyError, IndexError, TypeError):
        return False
    digest = body.get("subject", [{}])[0].get("digest", {}).get("sha256")
    commitment = body.get("predicate", {}).get("key_commitment")
    return digest == model_sha256 and (key_commitment is None or commitment == key_commitment)


def write_signatures(dest: Path, signature: bytes, statement_bytes: bytes) -> None:
    """Both files beside the copy's final path, each atomically (before the copy lands: a copy in dist/ is
    never unsigned; a kill may leave signatures of a copy the next run issues again, which it overwrites)."""
    write_bytes_atomic(f"{dest}{SIGNATURE_SUFFIX}", signature, mode=0o644)
    write_bytes_atomic(f"{dest}{STATEMENT_SUFFIX}", statement_bytes, mode=0o644)
