"""A site's YAML configuration (who it is, where its hub is, its datasets and its policy) and
private key files at rest.

Private keys (the Ed25519 identity key and the X25519 key a site receives sealed payloads
under) are PKCS#8 PEM files created 0600 (inside 0700 directories) from the start, encrypted
with the passphrase in MEDVEIL_KEY_PASSPHRASE when it is set; a key file that other users may
read or write is refused, and an encrypted one needs its passphrase.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from medveil.crypto.signing import KeyLocked, SigningKey, is_encrypted_pem
from medveil.data.sources import DatasetConfig
from medveil.privacy.disclosure import DisclosurePolicy
from medveil.runtime.study import NAME_PATTERN


PASSPHRASE_ENV = "MEDVEIL_KEY_PASSPHRASE"


class ConfigError(ValueError):
    pass


class KeyFileError(ConfigError):
    """A private key file is missing, readable by others, or locked without its passphrase."""


def passphrase_from_env() -> bytes | None:
    """The key passphrase from MEDVEIL_KEY_PASSPHRASE, or None when it is unset or empty."""
    value = os.environ.get(PASSPHRASE_ENV, "")
    return value.encode("utf-8") if value else None


def make_private_dir(path: Path) -> Path:
    """Create (or narrow) a directory only its owner may enter: mode 0700 whatever the umask."""
    path = Path(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def write_private_file(path: Path, data: bytes) -> None:
    """Write a new file readable only by its owner (0600 from creation); an existing file is refused."""
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(descriptor, 0o600)  # the umask may have narrowed it further; make it exactly 0600
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view):]
    finally:
        os.close(descriptor)


def write_private_key(path: Path, key: SigningKey, passphrase: bytes | None = None) -> None:
    """Save a private key as PEM, 0600, encrypted when a passphrase is given."""
    write_private_file(Path(path), key.to_pem(passphrase))


def check_private_file(path: Path) -> None:
    """Refuse a private key file that any user but its owner may read or write (as ssh does)."""
    mode = Path(path).stat().st_mode
    if os.name == "posix" and mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(f"private key {path} is open to other users (mode {stat.S_IMODE(mode):04o}); "
                           f"restrict it with: chmod 600 {path}")


def key_file_is_encrypted(path: Path) -> bool:
    return is_encrypted_pem(Path(path).read_bytes())


def _read_private_pem(path: Path, what: str) -> bytes:
    """A key file's bytes, after checking only its owner may use it (else KeyFileError)."""
    try:
        check_private_file(path)
        return path.read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror}") from exc


def read_private_key(path: Path, passphrase: bytes | None = None) -> SigningKey:
    """Load a private key file after checking only its owner may use it; the passphrase defaults
    to MEDVEIL_KEY_PASSPHRASE. Unencrypted keys load too (callers may warn)."""
    path = Path(path)
    pem = _read_private_pem(path, "private key")
    try:
        return SigningKey.from_pem(pem, passphrase or passphrase_from_env())
    except KeyLocked as exc:
        raise KeyFileError(f"private key {path}: {exc}; set {PASSPHRASE_ENV}") from exc
    except ValueError as exc:
        raise KeyFileError(f"{path} is not an Ed25519 private key in PEM") from exc


def write_encryption_key(path: Path, raw: bytes, passphrase: bytes | None = None) -> None:
    """Save a raw X25519 private key as PKCS#8 PEM, 0600, encrypted when a passphrase is given
    (default MEDVEIL_KEY_PASSPHRASE); an existing file is refused."""
    passphrase = passphrase or passphrase_from_env()
    encryption = (serialization.BestAvailableEncryption(passphrase) if passphrase
                  else serialization.NoEncryption())
    pem = X25519PrivateKey.from_private_bytes(raw).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    write_private_file(Path(path), pem)


def read_encryption_key(path: Path, passphrase: bytes | None = None) -> bytes:
    """The raw X25519 private key in a PEM file, after checking only its owner may use it; the
    passphrase defaults to MEDVEIL_KEY_PASSPHRASE."""
    path = Path(path)
    pem = _read_private_pem(path, "encryption key")
    encrypted = is_encrypted_pem(pem)
    passphrase = passphrase or passphrase_from_env()
    if encrypted and not passphrase:
        raise KeyFileError(f"encryption key {path} is encrypted: set {PASSPHRASE_ENV}")
    try:
        key = serialization.load_pem_private_key(pem, password=passphrase if encrypted else None)
    except (ValueError, TypeError) as exc:
        problem = "the passphrase does not unlock it" if encrypted else "it is not a PEM private key"
        raise KeyFileError(f"encryption key {path}: {problem}") from exc
    if not isinstance(key, X25519PrivateKey):
        raise KeyFileError(f"{path} is not an X25519 private key")
    return key.private_bytes_raw()


class SiteConfig(BaseModel):
    """Everything a node needs to start; relative paths are relative to the YAML file."""

    model_config = ConfigDict(extra="forbid")

    site: str = Field(pattern=NAME_PATTERN)
    hub: str
    identity: Path = Path("node.key")
    steward_key: Path = Path("steward.pub")
    encryption_key: Path | None = Field(None, description="the site's X25519 private key file (0600), for "
                                                          "payloads sealed to the site; its public half is "
                                                          "pinned in studies as site_encryption_keys")
    state_dir: Path = Path("state")
    invitation: str | None = Field(None, description="the hub operator's invitation, needed to register once")
    poll_wait_s: float = Field(20.0, gt=0, le=30)
    max_message_bytes: int = Field(256 * 1024 * 1024, gt=0)
    policy: DisclosurePolicy = Field(default_factory=DisclosurePolicy)
    datasets: dict[str, DatasetConfig] = Field(default_factory=dict)

    def resolved(self, base: Path) -> "SiteConfig":
        def fix(path: Path) -> Path:
            return path if path.is_absolute() else base / path

        return self.model_copy(update={
            "identity": fix(self.identity),
            "steward_key": fix(self.steward_key),
            "encryption_key": None if self.encryption_key is None else fix(self.encryption_key),
            "state_dir": fix(self.state_dir),
            "datasets": {name: ds.resolved(base) for name, ds in self.datasets.items()},
        })


def load_site_config(path: Path) -> SiteConfig:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read site config {path}: {exc}") from exc
    try:
        return SiteConfig.model_validate(raw).resolved(path.resolve().parent)
    except ValidationError as exc:
        raise ConfigError(f"invalid site config {path}:\n{exc}") from exc


def dump_site_config(config: SiteConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
