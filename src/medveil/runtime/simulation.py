"""A whole federation on this machine: a real hub and real nodes over loopback HTTP, or the same
nodes reached in-process (no HTTP, no hub) for fast unit tests.

Each site gets its own identity, X25519 encryption key (for payloads sealed to it), steward key,
state directory and audit log, registers with the hub on an invitation from the hub's operator,
and its steward approves the simulation study (which pins every site's identity and encryption
key), exactly as in a deployment; only the keys are generated on the fly (unencrypted, 0600 in
0700 directories; stewards' keys apart from the nodes', under `stewards/`) and the data may be
in-memory DataFrames. The in-process federation sets the sites up the same way and hands each
step straight to `Node.handle` (runtime/grid.py, InProcessGrid). The hub and server code is
imported only when a loopback network starts.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
from threadpoolctl import threadpool_limits

from medveil.analyses.base import registered_names
from medveil.crypto.sealed import generate_encryption_key
from medveil.crypto.signing import SigningKey
from medveil.data.sources import DatasetConfig, load_dataset
from medveil.privacy.disclosure import DisclosurePolicy
from medveil.runtime.client import HubClient
from medveil.runtime.config import (
    SiteConfig,
    dump_site_config,
    make_private_dir,
    write_encryption_key,
    write_private_key,
)
from medveil.runtime.grid import InProcessClient, InProcessGrid
from medveil.runtime.node import Node
from medveil.runtime.services import service_names
from medveil.runtime.study import StudySpec

if TYPE_CHECKING:
    from medveil.runtime.servers import HubServer, NodeProcess, NodeThread

TableLike = pd.DataFrame | str | Path
SiteData = TableLike | Mapping[str, TableLike]
Policies = DisclosurePolicy | Mapping[str, DisclosurePolicy] | None
DEFAULT_DATASET = "default"


def _dataset_config(source: str | Path) -> DatasetConfig:
    """A site's table given as a path: a folder is an image dataset (its labels.csv inside), a
    file is CSV, Parquet or PLINK by its extension."""
    path = Path(source)
    if path.is_dir():
        return DatasetConfig(kind="images", path=path.resolve())
    suffix = path.suffix.lower()
    kind = "parquet" if suffix in (".parquet", ".pq") else "plink" if suffix == ".bed" else "csv"
    return DatasetConfig(kind=kind, path=path.resolve())


def _columns(name: str, source: TableLike) -> list[str]:
    """The variables a site's table offers the study: its columns (an image folder's: its labels')."""
    if isinstance(source, pd.DataFrame):
        return [str(c) for c in source.columns]
    config = _dataset_config(source)
    if config.kind == "plink":
        return []  # a genotype dataset is approved whole; nothing of it is a "variable"
    return [str(c) for c in load_dataset(name, config).columns]


class _Federation:
    """What both simulated networks offer alike (their `workdir` holds the sites and stewards' keys)."""

    workdir: Path

    def steward_key_path(self, site: str) -> Path:
        """Where the simulation keeps a site's steward key: beside, not inside, the node's directory."""
        return self.workdir / "stewards" / f"{site}.key"


@dataclass
class LocalNetwork(_Federation):
    """A real hub and real nodes on loopback HTTP; `researcher` is the researcher's HubClient."""

    hub: HubServer
    researcher: HubClient
    study: StudySpec
    workdir: Path
    nodes: dict[str, Any] = field(default_factory=dict)
    _tempdir: Any = None
    _blas_limit: Any = None

    def add_study(self, study_id: str, datasets: dict[str, list[str]], *, analyses: list[str] | None = None,
                  approved_by: list[str] | None = None, **options: Any) -> StudySpec:
        """Publish another study of the same researcher; the listed sites' stewards approve it."""
        spec = StudySpec(id=study_id, researcher=self.study.researcher, researcher_key=self.study.researcher_key,
                         sites=self.study.sites, site_keys=self.study.site_keys, datasets=datasets,
                         analyses=analyses or registered_names(), **options)
        self.researcher.post_study(self.researcher.seal("study", {"spec": spec.model_dump()}, study=spec.id))
        for site in self.study.sites if approved_by is None else approved_by:
            node = Node.from_config_file(self.workdir / site / "site.yaml")
            try:
                node.approve(spec.id, SigningKey.from_pem(self.steward_key_path(site).read_bytes()))
            finally:
                node.close()
        return spec

    def close(self) -> None:
        """Stop the nodes and the hub, then delete a temporary work directory."""
        from medveil.runtime.servers import NodeThread

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


@dataclass
class _Sites:
    """What both kinds of simulated federation set up alike: keys, site directories and configs, the study."""

    root: Path
    tables: dict[str, dict[str, TableLike]]
    identities: dict[str, SigningKey]
    stewards: dict[str, SigningKey]
    configs: dict[str, SiteConfig]
    frames: dict[str, dict[str, pd.DataFrame]]
    researcher_key: SigningKey
    study: StudySpec

    def node(self, site: str, client: HubClient, **options: Any) -> Node:
        """The site's real node: its config, identity, steward's key and in-memory tables, over `client`."""
        return Node(self.configs[site], self.identities[site], self.stewards[site].verify_key,
                    frames=self.frames[site], client=client, **options)


def _prepare_sites(sites: Mapping[str, SiteData], root: Path, hub_url: str, *, policy: Policies, processes: bool,
                   study_id: str, analyses: list[str] | None, secure_aggregation: bool,
                   secagg_threshold: int | None, roles: Mapping[str, str] | None = None,
                   models: list[str] | None = None) -> _Sites:
    """The study set-up both simulated federations share: generate every party's keys, write each
    site's directory (keys 0600, site.yaml; with `processes`, in-memory tables as CSV files) and
    the study over every variable of every dataset, pinning each site's identity and encryption key.
    With party `roles`, each site is approved for its own tables' columns only (`site_datasets`).
    `models`: the model recipes ("name@version") the study may train; None: every registered one."""
    tables = {site: dict(d) if isinstance(d, Mapping) else {DEFAULT_DATASET: d} for site, d in sites.items()}
    variables: dict[str, set[str]] = {}
    own: dict[str, dict[str, list[str]]] = {}
    for site, site_tables in tables.items():
        for name, source in site_tables.items():
            columns = _columns(name, source)
            variables.setdefault(name, set()).update(columns)
            own.setdefault(site, {})[name] = sorted(columns)
    policies = policy if isinstance(policy, Mapping) else {site: policy or DisclosurePolicy() for site in tables}
    make_private_dir(root / "stewards")
    identities, stewards, configs, frames, encryption = {}, {}, {}, {}, {}
    for site, site_tables in tables.items():
        directory = make_private_dir(root / site)
        make_private_dir(directory / "state")
        identities[site], stewards[site] = SigningKey.generate(), SigningKey.generate()
        private, encryption[site] = generate_encryption_key()
        frames[site] = {name: src for name, src in site_tables.items() if isinstance(src, pd.DataFrame)}
        datasets = {name: _dataset_config(src) for name, src in site_tables.items()
                    if not isinstance(src, pd.DataFrame)}
        if processes:
            for name, frame in frames[site].items():
                path = directory / f"{name}.csv"
                frame.to_csv(path, index=False)
                datasets[name] = DatasetConfig(kind="csv", path=path)
            frames[site] = {}
        config = SiteConfig(site=site, hub=hub_url, identity=directory / "node.key",
                            steward_key=directory / "steward.pub", encryption_key=directory / "encryption.key",
                            state_dir=directory / "state", policy=policies.get(site) or DisclosurePolicy(),
                            datasets=datasets, poll_wait_s=20.0)
        write_private_key(config.identity, identities[site])
        write_encryption_key(config.encryption_key, private)
        config.steward_key.write_text(stewards[site].verify_key.to_text() + "\n")
        write_private_key(root / "stewards" / f"{site}.key", stewards[site])
        (directory / "site.yaml").write_text(dump_site_config(config))
        configs[site] = config
    researcher_key = SigningKey.generate()
    study = StudySpec(
        id=study_id, title="simulated federation", researcher="researcher",
        researcher_key=researcher_key.verify_key.to_text(), sites=sorted(tables),
        site_keys={site: key.verify_key.to_text() for site, key in identities.items()},
        site_encryption_keys=encryption,
        datasets={name: sorted(cols) for name, cols in variables.items()},
        analyses=analyses or registered_names(), secure_aggregation=secure_aggregation,
        secagg_threshold=secagg_threshold, roles=dict(roles or {}),
        site_datasets={site: own.get(site, {}) for site in tables} if roles else {},
        models=_every_model() if models is None else list(models), services=service_names(),
    )
    return _Sites(root, tables, identities, stewards, configs, frames, researcher_key, study)


def _every_model() -> list[str]:
    """Every model recipe registered here, as "name@version" (no torch needed to list them)."""
    from medveil.models import registered_models

    return [f"{name}@{version}" for name, version in registered_models()]


def _workdir(sites: Mapping[str, SiteData], workdir: str | Path | None) -> tuple[Path, Any]:
    """The federation's private work directory (a temporary one when None) and its tempdir handle."""
    if not sites:
        raise ValueError("a simulated federation needs at least one site")
    tempdir = None
    if workdir is None:
        tempdir = tempfile.TemporaryDirectory(prefix="medveil-")
        workdir = tempdir.name
    return make_private_dir(Path(workdir)), tempdir


def start_local_network(
    sites: Mapping[str, SiteData], *, workdir: str | Path | None = None, record_hub_traffic: bool = False,
    policy: Policies = None, processes: bool = False, study_id: str = "simulation",
    analyses: list[str] | None = None, hub_db: str | None = None, secure_aggregation: bool = True,
    secagg_threshold: int | None = None, roles: Mapping[str, str] | None = None, models: list[str] | None = None,
) -> LocalNetwork:
    """Start hub and nodes, register everyone, create and approve one study over all variables
    (`_prepare_sites`, as `start_in_process`); `policy` may be one policy or one per site."""
    from medveil.runtime.servers import HubServer

    root, tempdir = _workdir(sites, workdir)
    hub = HubServer(hub_db or f"sqlite:///{root / 'hub.db'}", record_traffic=record_hub_traffic).start()
    researcher: HubClient | None = None
    network: LocalNetwork | None = None
    try:
        prepared = _prepare_sites(sites, root, hub.url, policy=policy, processes=processes, study_id=study_id,
                                  analyses=analyses, secure_aggregation=secure_aggregation,
                                  secagg_threshold=secagg_threshold, roles=roles, models=models)
        key = prepared.researcher_key
        researcher = HubClient(hub.url, "researcher", key,
                               invitation=hub.invite("researcher", "researcher", key.verify_key.to_text()))
        network = LocalNetwork(hub, researcher, prepared.study, root, _tempdir=tempdir)
        researcher.register("researcher")
        study = prepared.study
        researcher.pin(study.site_keys)
        researcher.post_study(researcher.seal("study", {"spec": study.model_dump()}, study=study.id))
        for site in prepared.tables:
            network.nodes[site] = _start_site(site, prepared, network, processes)
    except BaseException:
        if network is not None:
            network.close()
        else:
            hub.stop()
            if tempdir is not None:
                tempdir.cleanup()
        if researcher is not None:
            researcher.close()
        raise
    if processes:
        _wait_until_polling(network)
    else:
        # Nodes in threads share this process's BLAS pool, where each site would have its own
        # machine: one BLAS thread per caller stops them oversubscribing the cores.
        network._blas_limit = threadpool_limits(limits=1, user_api="blas")
    return network


def _start_site(site: str, prepared: _Sites, network: LocalNetwork, processes: bool) -> NodeThread | NodeProcess:
    """Enrol the site at the hub, have its steward approve the study, and run its node polling
    (in a thread, or in a process of its own reading the site's directory)."""
    from medveil.runtime.servers import NodeProcess, NodeThread

    identity = prepared.identities[site]
    invitation = network.hub.invite(site, "site", identity.verify_key.to_text())
    client = HubClient(network.hub.url, site, identity, max_bytes=prepared.configs[site].max_message_bytes,
                       invitation=invitation)
    node = prepared.node(site, client)
    node.register()
    node.approve(network.study.id, prepared.stewards[site])
    if not processes:
        return NodeThread(node).start()
    node.close()
    directory = network.workdir / site
    return NodeProcess(directory / "site.yaml", directory / "node.log").start()


def _wait_until_polling(network: LocalNetwork, timeout: float = 120.0) -> None:
    """Node processes take a moment to import; wait until each polls (`timeout` only bounds a hang)."""
    for runner in network.nodes.values():
        runner.wait_until_polling(timeout)


@dataclass
class InProcessNetwork(_Federation):
    """Real nodes reached in-process: the researcher's InProcessGrid hands them each step directly."""

    grid: InProcessGrid
    study: StudySpec
    workdir: Path
    nodes: dict[str, Node] = field(default_factory=dict)
    _tempdir: Any = None

    def close(self) -> None:
        """Close the nodes, then delete a temporary work directory."""
        self.grid.close()
        if self._tempdir is not None:
            self._tempdir.cleanup()
            self._tempdir = None


def start_in_process(
    sites: Mapping[str, SiteData], *, workdir: str | Path | None = None, policy: Policies = None,
    study_id: str = "simulation", analyses: list[str] | None = None, secure_aggregation: bool = True,
    secagg_threshold: int | None = None, roles: Mapping[str, str] | None = None, models: list[str] | None = None,
) -> InProcessNetwork:
    """The same sites, keys, study and stewards' approvals as `start_local_network`, without a hub:
    `policy` may be one policy or one per site."""
    root, tempdir = _workdir(sites, workdir)
    network: InProcessNetwork | None = None
    try:
        prepared = _prepare_sites(sites, root, "http://in-process.invalid", policy=policy, processes=False,
                                  study_id=study_id, analyses=analyses, secure_aggregation=secure_aggregation,
                                  secagg_threshold=secagg_threshold, roles=roles, models=models)
        study = prepared.study
        grid = InProcessGrid({}, study, prepared.researcher_key, party=study.researcher)
        published = grid.seal("study", {"spec": study.model_dump()}, study=study.id)
        network = InProcessNetwork(grid, study, root, _tempdir=tempdir)
        for site, config in prepared.configs.items():
            client = InProcessClient(site, prepared.identities[site], {study.id: published},
                                     max_bytes=config.max_message_bytes)
            node = prepared.node(site, client, senders=grid.senders)
            grid.nodes[site] = node
            network.nodes[site] = node
            node.approve(study.id, prepared.stewards[site])
    except BaseException:
        if network is not None:
            network.close()
        elif tempdir is not None:
            tempdir.cleanup()
        raise
    return network
