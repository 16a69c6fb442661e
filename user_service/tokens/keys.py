"""The signing key and the public keys published in the JWKS.

Every key's ``kid`` is its RFC 7638 thumbprint, so replicas loading the same key agree on it
and a verifier can tell keys apart without any shared registry.
"""

from __future__ import annotations

import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from joserfc.jwk import Key, KeySet, OKPKey

from shared.tokens import SIGNING_ALGORITHM, KeyConfigurationError, public_keys_from_pem
from user_service.settings import UserServiceSettings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SigningKeys:
    signing_key: OKPKey
    previous_keys: tuple[Key, ...] = ()

    @property
    def kid(self) -> str:
        return self.signing_key.thumbprint()

    def jwks(self) -> dict[str, Any]:
        public: list[Key] = [OKPKey.import_key(self.signing_key.as_dict(private=False))]
        public.extend(self.previous_keys)
        return {
            "keys": [
                key.as_dict(private=False, kid=key.thumbprint(), use="sig", alg=SIGNING_ALGORITHM)
                for key in public
            ]
        }

    def verification_keys(self) -> KeySet:
        return KeySet.import_key_set(self.jwks())  # type: ignore[arg-type]


def load_signing_keys(settings: UserServiceSettings) -> SigningKeys:
    signing_key = _import_private_key(_configured_private_key(settings))
    previous = _configured_previous_keys(settings)
    keys = public_keys_from_pem(previous, setting="JWT_PREVIOUS_PUBLIC_KEYS")
    return SigningKeys(signing_key=signing_key, previous_keys=tuple(keys))


def _configured_private_key(settings: UserServiceSettings) -> str:
    if settings.jwt_private_key is not None:
        return settings.jwt_private_key.get_secret_value()
    if settings.jwt_private_key_file is not None:
        return settings.jwt_private_key_file.read_text()
    if settings.is_production:  # settings validation refuses this too; never fall through
        raise KeyConfigurationError("no JWT signing key configured")
    return _development_key(settings.jwt_dev_key_file)


def _configured_previous_keys(settings: UserServiceSettings) -> str:
    if settings.jwt_previous_public_keys:
        return settings.jwt_previous_public_keys
    if settings.jwt_previous_public_keys_file is not None:
        return settings.jwt_previous_public_keys_file.read_text()
    return ""


def _development_key(path: Path) -> str:
    if not path.exists():
        _create_key_file(path)
    pem = path.read_text()
    logger.warning(
        "no JWT_PRIVATE_KEY configured: signing with a development key; never use it in production",
        extra={"key_file": str(path)},
    )
    return pem


def _create_key_file(path: Path) -> None:
    """Write a new key so that replicas starting together end up with the same one: the file
    appears complete (written aside, then hard-linked into place) or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pem = OKPKey.generate_key("Ed25519").as_pem(private=True)
    # Not the pid: replicas in containers can all be pid 1 on the same shared volume.
    aside = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    fd = os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(pem)
    try:
        os.link(aside, path)
    except FileExistsError:
        pass  # another replica was first: use its key
    finally:
        aside.unlink()


def _import_private_key(pem: str) -> OKPKey:
    try:
        key = OKPKey.import_key(pem)
    except Exception as exc:  # joserfc and cryptography raise several types for a bad PEM
        raise KeyConfigurationError("JWT signing key is not an Ed25519 private key in PEM") from exc
    if not key.is_private or key.curve_name != "Ed25519":
        raise KeyConfigurationError("JWT signing key is not an Ed25519 private key in PEM")
    return key
