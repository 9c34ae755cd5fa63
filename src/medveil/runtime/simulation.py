"""A whole federation on this machine: a real hub and real nodes over loopback HTTP.

Each site gets its own identity, steward key, state directory and audit log, registers with
the hub on an invitation from the hub's operator, and its steward approves the simulation study
(which pins every site's identity key), exactly as in a deployment; only the keys are generated
on the fly (unencrypted, 0600 in 0700 directories; stewards' keys apart from the nodes', under
`stewards/`) and the data may be in-memory DataFrames.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Union

import pandas as pd
from threadpoolctl import threadpool_limits

from medveil.analyses.base import registered_names
from medveil.crypto.signing import SigningKey
from medveil.data.sources import DatasetConfig, load_dataset
from medveil.privacy.disclosure import DisclosurePolicy
from medveil.runtime.client import HubClient
from medveil.runtime.config import SiteConfig, dump_site_config, make_private_dir, write_private_key
from medveil.runtime.node import Node
from medveil.runtime.servers import HubServer, NodeProcess, NodeThread
from medveil.runtime.study import StudySpec

TableLike = Union[pd.DataFrame, str, Path]
SiteData = Union[TableLike, Mapping[str, TableLike]]
DEFAULT_DATASET = "default"


def _dataset_config(source: str | Path) -> DatasetConfig:
    path = Path(source)
    suffix = path.suffix.lower()
    kind = "parquet" if suffix in (".parquet", ".pq") else "plink" if suffix == ".bed" else "csv"
    return DatasetConfig(kind=kind, path=path.resolve())


def _columns(name: str, source: TableLike) -> list[str]:
    if isinstance(source, pd.DataFrame):
        return [str(c) for c in source.columns]
    config = _dataset_config(source)
    if config.kind == "plink":
        return []  # a genotype dataset is approved whole; nothing of it is a "variable"
    return [str(c) for c in load_dataset(name, config).columns]


@dataclass
class LocalNetwork:
    hub: HubServer
    researcher: HubClient
    study: StudySpec
    workdir: Path
    nodes: dict[str, Any] = field(default_factory=dict)
    _tempdir: Any = None
    _blas_limit: Any = None

    def steward_key_path(self, site: str) -> Path:
        """Where the simulation keeps a site's steward key: beside, not inside, the node's directory."""
        return self.workdir / "stewards" / f"{site}.key"

    def add_study(self, study_id: str, datasets: dict[str, list[str]], *, analyses: list[str] | None = None,
                  approved_by: list[str] | None = None, **options: Any) -> StudySpec:
        """Publish another study of the same researcher; the listed sites' stewards approve it."""
        spec = StudySpec(id=study_id, researcher=self.study.researcher, researcher_key=self.study.researcher_key,
                         sites=self.study.sites, site_keys=self.study.site_keys, datasets=datasets,
                         analyses=analyses or registered_names(), **options)
        self.researcher.post("/v1/studies", self.researcher.seal("study", {"spec": spec.model_dump()}, study=spec.id))
        for site in self.study.sites if approved_by is None else approved_by:
            node = Node.from_config_file(self.workdir / site / "site.yaml")
            try:
                node.approve(spec.id, SigningKey.from_pem(self.steward_key_path(site).read_bytes()))
            finally:
                node.close()
        return spec

    def close(self) -> None:
        for runner in self.nodes.values():
            if isinstance(runner, NodeThread):
                runner.signal_stop()
        self.hub.stop()
        for runner in self.nodes.values():
            runner.stop()
        if self._tempdir is not None:
            self._tempdir.cleanup()
        if self._blas_limit is not None:
            self._blas_limit.restore_original_limits()
            self._blas_limit = None


def start_local_network(
    sites: Mapping[str, SiteData], *, workdir: str | Path | None = None, record_hub_traffic: bool = False,
    policy: DisclosurePolicy | None = None, processes: bool = False, study_id: str = "simulation",
    analyses: list[str] | None = None, hub_db: str | None = None, secure_aggregation: bool = True,
    secagg_threshold: int | None = None,
) -> LocalNetwork:
    """Start hub and nodes, register everyone, create and approve one study over all variables."""
    if not sites:
        raise ValueError("simulate needs at least one site")
    tempdir = None
    if workdir is None:
        tempdir = tempfile.TemporaryDirectory(prefix="medveil-")
        workdir = tempdir.name
    root = make_private_dir(Path(workdir))
    hub = HubServer(hub_db or f"sqlite:///{root / 'hub.db'}", record_traffic=record_hub_traffic).start()
    researcher_key = SigningKey.generate()
    researcher = HubClient(hub.url, "researcher", researcher_key,
                           invitation=hub.invite("researcher", "researcher", researcher_key.verify_key.to_text()))
    network = LocalNetwork(hub, researcher, None, root, _tempdir=tempdir)  # type: ignore[arg-type]
    try:
        researcher.register("researcher")
        tables = {site: dict(d) if isinstance(d, Mapping) else {DEFAULT_DATASET: d} for site, d in sites.items()}
        variables: dict[str, set[str]] = {}
        for site_tables in tables.values():
            for name, source in site_tables.items():
                variables.setdefault(name, set()).update(_columns(name, source))
        identities = {site: SigningKey.generate() for site in tables}
        study = StudySpec(
            id=study_id, title="simulated federation", researcher="researcher",
            researcher_key=researcher_key.verify_key.to_text(), sites=sorted(tables),
            site_keys={site: key.verify_key.to_text() for site, key in identities.items()},
            datasets={name: sorted(cols) for name, cols in variables.items()},
            analyses=analyses or registered_names(), secure_aggregation=secure_aggregation,
            secagg_threshold=secagg_threshold,
        )
        network.study = study
        researcher.pin(study.site_keys)
        researcher.post("/v1/studies", researcher.seal("study", {"spec": study.model_dump()}, study=study.id))
        make_private_dir(root / "stewards")
        for site, site_tables in tables.items():
            network.nodes[site] = _start_site(site, site_tables, network, identities[site], policy, processes)
    except BaseException:
        network.close()
        researcher.close()
        raise
    if processes:
        _wait_until_polling(network)
    else:
        # Nodes in threads share this process's BLAS pool, where each site would have its own
        # machine: one BLAS thread per caller stops them oversubscribing the cores.
        network._blas_limit = threadpool_limits(limits=1, user_api="blas")
    return network


def _start_site(site: str, site_tables: dict[str, TableLike], network: LocalNetwork, identity: SigningKey,
                policy: DisclosurePolicy | None, processes: bool) -> NodeThread | NodeProcess:
    directory = make_private_dir(network.workdir / site)
    make_private_dir(directory / "state")
    steward = SigningKey.generate()
    frames = {name: src for name, src in site_tables.items() if isinstance(src, pd.DataFrame)}
    datasets = {name: _dataset_config(src) for name, src in site_tables.items() if not isinstance(src, pd.DataFrame)}
    if processes:
        for name, frame in frames.items():
            path = directory / f"{name}.csv"
            frame.to_csv(path, index=False)
            datasets[name] = DatasetConfig(kind="csv", path=path)
        frames = {}
    config = SiteConfig(site=site, hub=network.hub.url, identity=directory / "node.key",
                        steward_key=directory / "steward.pub", state_dir=directory / "state",
                        policy=policy or DisclosurePolicy(), datasets=datasets, poll_wait_s=20.0)
    write_private_key(config.identity, identity)
    config.steward_key.write_text(steward.verify_key.to_text() + "\n")
    write_private_key(network.steward_key_path(site), steward)
    (directory / "site.yaml").write_text(dump_site_config(config))
    invitation = network.hub.invite(site, "site", identity.verify_key.to_text())
    client = HubClient(network.hub.url, site, identity, max_bytes=config.max_message_bytes, invitation=invitation)
    node = Node(config, identity, steward.verify_key, frames=frames, client=client)
    node.register()
    node.approve(network.study.id, steward)
    if not processes:
        return NodeThread(node).start()
    node.close()
    return NodeProcess(directory / "site.yaml", directory / "node.log").start()


def _wait_until_polling(network: LocalNetwork, timeout: float = 120.0) -> None:
    """Node processes take a moment to import; wait until each polls (`timeout` only bounds a hang)."""
    for runner in network.nodes.values():
        runner.wait_until_polling(timeout)
