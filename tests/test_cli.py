"""The `medveil` command end to end: a deployment made only with CLI commands, then mv.connect."""

from __future__ import annotations

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
    for command in ([], ["hub"], ["node"], ["study"], ["run"], ["audit"]):
        assert "Usage" in runner.invoke(app, [*command, "--help"]).output


@pytest.mark.e2e
def test_deployment_through_the_cli(tmp_path):
    port = _free_port()
    hub_url = f"http://127.0.0.1:{port}"
    hub = subprocess.Popen([sys.executable, "-m", "medveil", "hub", "start", "--port", str(port),
                            "--db", f"sqlite:///{tmp_path / 'hub.db'}"])
    nodes = []
    try:
        for _ in range(100):
            try:
                httpx.get(f"{hub_url}/v1/health", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.1)
        rng = np.random.default_rng(5)
        frames = {}
        for site in ("north", "south"):
            directory = tmp_path / site
            _invoke("node", "init", str(directory), "--site", site, "--hub", hub_url)
            frames[site] = pd.DataFrame({"age": rng.normal(50, 9, 40).round(1), "sex": rng.choice(["F", "M"], 40)})
            frames[site].to_csv(directory / "cohort.csv", index=False)
            config = yaml.safe_load((directory / "site.yaml").read_text())
            config["datasets"] = {"cohort": {"kind": "csv", "path": "cohort.csv"}}
            (directory / "site.yaml").write_text(yaml.safe_dump(config))
        _invoke("keygen", str(tmp_path / "alice.key"))
        (tmp_path / "study.yaml").write_text(yaml.safe_dump({
            "id": "cli-study", "title": "CLI study", "sites": ["north", "south"],
            "datasets": {"cohort": ["age", "sex"]}, "analyses": ["describe", "crosstab"]}))
        _invoke("study", "create", "--spec", str(tmp_path / "study.yaml"), "--hub", hub_url,
                "--identity", str(tmp_path / "alice.key"), "--researcher", "alice")
        for site in ("north", "south"):
            directory = tmp_path / site
            _invoke("study", "approve", "cli-study", "--config", str(directory / "site.yaml"),
                    "--steward-key", str(directory / "steward.key"), "--yes")
            nodes.append(subprocess.Popen([sys.executable, "-m", "medveil", "node", "start", "--config",
                                           str(directory / "site.yaml"), "--quiet"]))
        assert "north, south" in _invoke("study", "list", "--hub", hub_url)
        output = _invoke("run", "describe", "age", "--hub", hub_url, "--identity", str(tmp_path / "alice.key"),
                         "--study", "cli-study")
        assert "80" in output
        with mv.connect(hub_url, tmp_path / "alice.key", "cli-study", timeout=20) as fed:
            table = fed.crosstab("sex")
        pooled = pd.concat(frames.values())["sex"].value_counts()
        assert table.loc["F", "count"] == pooled["F"] and table.loc["M", "count"] == pooled["M"]
        assert "intact" in _invoke("audit", "verify", str(tmp_path / "north" / "state" / "audit.jsonl"))
    finally:
        for process in [*nodes, hub]:
            process.terminate()
            process.wait(timeout=10)


@pytest.mark.e2e
def test_run_gwas_writes_the_table_and_plots(tmp_path):
    from tests.e2e.test_gwas import _make

    sites, *_ = _make(tmp_path, n=180, m=60)
    with mv.Federation.simulate(sites) as fed:
        key = tmp_path / "researcher.key"
        key.write_bytes(fed.network.researcher.key.to_pem())
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
