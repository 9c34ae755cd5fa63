"""The `medveil` command end to end: a deployment made only with CLI commands, then mv.connect."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

import medveil as mv
from medveil.cli import app
from medveil.runtime.config import write_private_key

runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _invoke(*args: str) -> str:
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_help_everywhere():
    for command in ([], ["hub"], ["hub", "invite"], ["node"], ["study"], ["run"], ["audit"], ["fingerprint"], ["pir"],
                    ["pir", "build"], ["pir", "status"], ["run", "lookup"]):
        assert "Usage" in runner.invoke(app, [*command, "--help"]).output


def _wait_for(check, what: str, timeout: float = 120.0) -> None:
    """Poll `check` until true; `timeout` only bounds a hang."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen"
        time.sleep(0.1)


def _table_row(output: str, label: str) -> dict[str, str]:
    """The cells of the row `label` of the one table the CLI printed, by column name."""
    lines = output.splitlines()
    header = next(line for line in lines if line.startswith("┃"))
    row = next(line for line in lines if line.startswith("│") and line.strip("│ ").startswith(label))
    names = [cell.strip() for cell in header.strip("┃").split("┃")]
    cells = [cell.strip() for cell in row.strip("│").split("│")]
    assert len(names) == len(cells) and cells[0] == label, output
    return dict(zip(names, cells))


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.TransportError:
        return False


@pytest.mark.e2e
def test_deployment_through_the_cli(tmp_path, monkeypatch):
    """Operator, stewards and researcher each use only the CLI: keys encrypted at rest, parties
    enrolled by invitation, sites pinned in the study by key or by the fingerprint their steward gave."""
    monkeypatch.setenv("MEDVEIL_KEY_PASSPHRASE", "correct horse battery staple")
    port = _free_port()
    hub_url = f"http://127.0.0.1:{port}"
    operator_key = tmp_path / "operator.key"
    hub = subprocess.Popen([sys.executable, "-m", "medveil", "hub", "start", "--port", str(port),
                            "--db", f"sqlite:///{tmp_path / 'hub.db'}", "--operator-key", str(operator_key)])
    nodes = []
    try:
        _wait_for(lambda: _answers(f"{hub_url}/v1/health"), "the hub starting")
        rng = np.random.default_rng(5)
        frames, fingerprints, public_keys = {}, {}, {}
        for site in ("north", "south"):
            directory = tmp_path / site
            invitation = runner.invoke(app, ["hub", "invite", site, "--role", "site", "--operator-key",
                                             str(operator_key)]).stdout.strip()
            _invoke("node", "init", str(directory), "--site", site, "--hub", hub_url, "--invitation", invitation)
            assert directory.stat().st_mode & 0o777 == 0o700
            assert (directory / "node.key").stat().st_mode & 0o777 == 0o600
            assert (directory / "node.key").read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
            assert not (directory / "steward.key").exists()
            assert (tmp_path / f"{site}-steward.key").stat().st_mode & 0o777 == 0o600
            frames[site] = pd.DataFrame({"age": rng.normal(50, 9, 40).round(1), "sex": rng.choice(["F", "M"], 40)})
            frames[site].to_csv(directory / "cohort.csv", index=False)
            config = yaml.safe_load((directory / "site.yaml").read_text())
            config["datasets"] = {"cohort": {"kind": "csv", "path": "cohort.csv"}}
            (directory / "site.yaml").write_text(yaml.safe_dump(config))
            printed = _invoke("fingerprint", str(directory / "site.yaml")).split()
            public_keys[site] = printed[printed.index("key") + 1]
            fingerprints[site] = printed[printed.index("fingerprint") + 1]
            assert "registered" in _invoke("node", "register", "--config", str(directory / "site.yaml"))
        _invoke("keygen", str(tmp_path / "alice.key"))
        researcher_invitation = runner.invoke(app, ["hub", "invite", "alice", "--role", "researcher",
                                                    "--operator-key", str(operator_key)]).stdout.strip()
        (tmp_path / "study.yaml").write_text(yaml.safe_dump({
            "id": "cli-study", "title": "CLI study", "sites": ["north", "south"],
            "site_keys": {"north": fingerprints["north"], "south": public_keys["south"]},
            "datasets": {"cohort": ["age", "sex"]}, "analyses": ["describe", "crosstab"]}))
        _invoke("study", "create", "--spec", str(tmp_path / "study.yaml"), "--hub", hub_url,
                "--identity", str(tmp_path / "alice.key"), "--researcher", "alice",
                "--invitation", researcher_invitation)
        for site in ("north", "south"):
            _invoke("study", "approve", "cli-study", "--config", str(tmp_path / site / "site.yaml"),
                    "--steward-key", str(tmp_path / f"{site}-steward.key"), "--yes")
            nodes.append(subprocess.Popen([sys.executable, "-m", "medveil", "node", "start", "--config",
                                           str(tmp_path / site / "site.yaml"), "--quiet"]))
        assert "north, south" in _invoke("study", "list", "--hub", hub_url)
        output = _invoke("run", "describe", "age", "--hub", hub_url, "--identity", str(tmp_path / "alice.key"),
                         "--study", "cli-study")
        ages = pd.concat(frames.values())["age"]
        described = _table_row(output, "age")
        assert described["n"] == "80"
        assert described["mean"] == f"{ages.mean():.4g}" and described["sd"] == f"{ages.std():.4g}"
        with mv.connect(hub_url, tmp_path / "alice.key", "cli-study", timeout=60) as fed:
            table = fed.crosstab("sex")
        pooled = pd.concat(frames.values())["sex"].value_counts()
        assert table.loc["F", "count"] == pooled["F"] and table.loc["M", "count"] == pooled["M"]
        assert "intact" in _invoke("audit", "verify", str(tmp_path / "north" / "state" / "audit.jsonl"))
    finally:
        for process in [*nodes, hub]:
            process.terminate()
            process.wait(timeout=10)


def test_keys_readable_by_others_or_locked_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("MEDVEIL_KEY_PASSPHRASE", raising=False)
    key_path = tmp_path / "researcher.key"
    result = runner.invoke(app, ["keygen", str(key_path)])
    assert result.exit_code == 0 and "not encrypted" not in result.stdout and "unencrypted" in result.output
    assert key_path.stat().st_mode & 0o777 == 0o600
    key_path.chmod(0o644)
    result = runner.invoke(app, ["fingerprint", str(key_path)])
    assert result.exit_code == 1 and "chmod 600" in result.output
    key_path.chmod(0o600)
    assert "fingerprint" in _invoke("fingerprint", str(key_path))
    monkeypatch.setenv("MEDVEIL_KEY_PASSPHRASE", "s3cret")
    locked = tmp_path / "locked.key"
    _invoke("keygen", str(locked))
    monkeypatch.delenv("MEDVEIL_KEY_PASSPHRASE")
    result = runner.invoke(app, ["fingerprint", str(locked)])
    assert result.exit_code == 1 and "MEDVEIL_KEY_PASSPHRASE" in result.output
    monkeypatch.setenv("MEDVEIL_KEY_PASSPHRASE", "wrong")
    result = runner.invoke(app, ["fingerprint", str(locked)])
    assert result.exit_code == 1 and "does not unlock" in result.output


@pytest.mark.e2e
def test_run_gwas_writes_the_table_and_plots(tmp_path):
    from tests.e2e.test_gwas import _make

    sites, *_ = _make(tmp_path, n=180, m=60)
    with mv.Federation.simulate(sites) as fed:
        key = tmp_path / "researcher.key"
        write_private_key(key, fed.network.researcher.key)
        output = _invoke("run", "gwas", "case", "--genotypes", "geno", "--data", "cohort", "--test", "logistic",
                         "--covariate", "age", "--maf", "0.1", "--out", str(tmp_path / "gwas.tsv"),
                         "--manhattan", str(tmp_path / "manhattan.png"), "--qq", str(tmp_path / "qq.png"),
                         "--hub", fed.network.hub.url, "--identity", str(key), "--study", fed.study.id)
        expected = fed.gwas(genotypes="geno", phenotype="case", data="cohort", covariates=["age"], test="logistic",
                            maf=0.1)
    written = pd.read_csv(tmp_path / "gwas.tsv", sep="\t")
    np.testing.assert_allclose(written["P"], expected["P"], rtol=1e-12)
    assert "lambda_gc" in output and "removed by quality control" in output
    assert expected.nsmallest(1, "P")["ID"].iat[0] in output
    for plot in ("manhattan.png", "qq.png"):
        assert (tmp_path / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_key_files_are_private_from_creation_whatever_the_umask(tmp_path):
    import os

    from medveil.crypto.signing import SigningKey
    from medveil.runtime.config import KeyFileError, make_private_dir, read_private_key
    from medveil.runtime.node import Node

    previous = os.umask(0)
    try:
        directory = make_private_dir(tmp_path / "node")
        write_private_key(directory / "node.key", SigningKey.generate(), b"pass")
    finally:
        os.umask(previous)
    assert directory.stat().st_mode & 0o777 == 0o700
    assert (directory / "node.key").stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        write_private_key(directory / "node.key", SigningKey.generate())
    assert read_private_key(directory / "node.key", b"pass")
    with pytest.raises(KeyFileError, match="MEDVEIL_KEY_PASSPHRASE"):
        read_private_key(directory / "node.key")
    _invoke("node", "init", str(tmp_path / "site"), "--site", "site_a", "--hub", "http://127.0.0.1:9")
    (tmp_path / "site" / "node.key").chmod(0o644)
    with pytest.raises(KeyFileError, match="open to other users"):
        Node.from_config_file(tmp_path / "site" / "site.yaml")


@pytest.fixture(scope="module")
def pir_federation(tmp_path_factory):
    """Two sites with a PLINK fileset and a phenotype table each (tests/runtime/test_pir_service.py's
    synthetic sites) over a real hub, and a study that lists variant_profile and the beacon."""
    from tests.runtime.test_pir_service import MIN, synthetic_site

    import medveil.analyses.beacon  # noqa: F401 - registers the beacon for the study's analyses
    from medveil.privacy.disclosure import DisclosurePolicy

    folder = tmp_path_factory.mktemp("pir")
    sites, truth = {}, {}
    for seed, site in enumerate(("north", "south")):
        bed, table, variants, dosage = synthetic_site(folder / site, seed)
        table.to_csv(folder / site / "pheno.csv", index=False)
        sites[site], truth[site] = {"pheno": folder / site / "pheno.csv", "geno": bed}, (table, variants, dosage)
    with mv.Federation.simulate(sites, timeout=120, policy=DisclosurePolicy(min_cell_count=MIN)) as fed:
        spec = fed.network.add_study("lookups", {"pheno": ["iid"], "geno": []}, services=["variant_profile"])
        key = folder / "researcher.key"
        write_private_key(key, fed.network.researcher.key)
        yield fed, spec, key, truth, folder


@pytest.mark.e2e
def test_pir_build_status_and_run_lookup(pir_federation):
    from tests.runtime.test_pir_service import GROUPS, expected_records

    fed, spec, key, truth, folder = pir_federation
    network = fed.network
    for site in spec.sites:
        output = _invoke("pir", "build", "--config", str(network.workdir / site / "site.yaml"), "--dataset", "pheno",
                         "--genotypes", "geno", "--steward-key", str(network.steward_key_path(site)),
                         "--option", f"group_columns={','.join(GROUPS)}", "--option", "slots=4")
        assert f"{site} built variant_profile" in output and "records" in output
    status = _invoke("pir", "status", "--config", str(network.workdir / "north" / "site.yaml"))
    assert _table_row(status, "stale")["value"] == "no"
    assert _table_row(status, "p")["value"].isdigit() and _table_row(status, "layout")["value"].startswith("256 rows")
    expected = expected_records(*truth["north"])
    present = sorted(k for k, v in expected.items() if v is not None)[0]
    output = _invoke("run", "lookup", "--variant", present, "--variant", "9:1:A:G", "--site", "north",
                     "--cache-dir", str(network.workdir / "pir-cache"), "--hub", network.hub.url,
                     "--identity", str(key), "--study", spec.id)
    assert _table_row(output, "found") == {"field": "found", present: "yes", "9:1:A:G": "no record"}
    assert _table_row(output, "carriers") == {"field": "carriers", present: str(expected[present]["total"]),
                                              "9:1:A:G": "-"}
    hom = expected[present]["hom_alt"]
    assert _table_row(output, "hom_alt")[present] == ("suppressed" if hom is None else str(hom))
    assert "whole column" in output
    assert any((network.workdir / "pir-cache" / spec.id).glob("north.*.hint"))  # the hint is kept for next time
    bad = runner.invoke(app, ["run", "lookup", "--variant", "1:100:A", "--site", "north", "--hub", network.hub.url,
                              "--identity", str(key), "--study", spec.id])
    assert bad.exit_code == 1 and "chrom:pos:REF:ALT" in bad.output
    # the table changes: status reports the build stale (rebuilding is the steward's call, never automatic)
    table_file = folder / "north" / "pheno.csv"
    stat = table_file.stat()
    os.utime(table_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    stale = _table_row(_invoke("pir", "status", "--config", str(network.workdir / "north" / "site.yaml")), "stale")
    assert stale["value"].startswith("yes") and "dataset" in stale["value"]
