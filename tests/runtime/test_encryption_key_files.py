"""A site's X25519 encryption key at rest: 0600 PEM, refused when others may read it, locked
without its passphrase, and named in site.yaml relative to the file."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from medveil.cli import app
from medveil.crypto.sealed import encryption_public_key, generate_encryption_key
from medveil.crypto.signing import SigningKey
from medveil.runtime.config import (
    KeyFileError,
    SiteConfig,
    dump_site_config,
    load_site_config,
    read_encryption_key,
    write_encryption_key,
    write_private_key,
)


def test_round_trip_is_0600_and_refuses_to_overwrite(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDVEIL_KEY_PASSPHRASE", raising=False)
    private, public = generate_encryption_key()
    path = tmp_path / "encryption.key"
    write_encryption_key(path, private)
    assert path.stat().st_mode & 0o777 == 0o600
    assert read_encryption_key(path) == private and encryption_public_key(read_encryption_key(path)) == public
    with pytest.raises(FileExistsError):
        write_encryption_key(path, generate_encryption_key()[0])


def test_a_key_open_to_others_is_refused(tmp_path):
    path = tmp_path / "encryption.key"
    write_encryption_key(path, generate_encryption_key()[0], b"pw")
    path.chmod(0o640)
    with pytest.raises(KeyFileError, match="chmod 600"):
        read_encryption_key(path, b"pw")


def test_an_encrypted_key_needs_its_passphrase(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDVEIL_KEY_PASSPHRASE", raising=False)
    private = generate_encryption_key()[0]
    path = tmp_path / "encryption.key"
    write_encryption_key(path, private, b"right")
    assert path.read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with pytest.raises(KeyFileError, match="MEDVEIL_KEY_PASSPHRASE"):
        read_encryption_key(path)
    with pytest.raises(KeyFileError, match="does not unlock"):
        read_encryption_key(path, b"wrong")
    monkeypatch.setenv("MEDVEIL_KEY_PASSPHRASE", "right")
    assert read_encryption_key(path) == private


def test_an_identity_key_is_not_an_encryption_key(tmp_path):
    path = tmp_path / "node.key"
    write_private_key(path, SigningKey.generate())
    with pytest.raises(KeyFileError, match="not an X25519"):
        read_encryption_key(path)
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"not a key")
    garbage.chmod(0o600)
    with pytest.raises(KeyFileError, match="not a PEM"):
        read_encryption_key(garbage)


def test_site_config_resolves_and_dumps_the_encryption_key(tmp_path):
    dumped = dump_site_config(SiteConfig(site="a", hub="http://hub", encryption_key="encryption.key"))
    assert yaml.safe_load(dumped)["encryption_key"] == "encryption.key"
    (tmp_path / "site.yaml").write_text(dumped)
    assert load_site_config(tmp_path / "site.yaml").encryption_key == tmp_path / "encryption.key"
    assert SiteConfig(site="a", hub="http://hub").resolved(tmp_path).encryption_key is None


def test_node_init_makes_the_encryption_key_and_fingerprint_prints_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVEIL_KEY_PASSPHRASE", "pw")
    runner = CliRunner()
    result = runner.invoke(app, ["node", "init", str(tmp_path / "north"), "--site", "north", "--hub", "http://hub"])
    assert result.exit_code == 0, result.output
    key_path = tmp_path / "north" / "encryption.key"
    assert key_path.stat().st_mode & 0o777 == 0o600
    public = encryption_public_key(read_encryption_key(key_path))
    assert f"encryption key of north (for a study's site_encryption_keys): {public}" in " ".join(result.output.split())
    assert load_site_config(tmp_path / "north" / "site.yaml").encryption_key == key_path
    printed = runner.invoke(app, ["fingerprint", str(tmp_path / "north" / "site.yaml")])
    assert printed.exit_code == 0 and printed.output.split()[printed.output.split().index("encryption") + 1] == public
