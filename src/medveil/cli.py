"""The `medveil` command: a thin layer over the runtime and the researcher API."""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Optional

import typer
import yaml
from rich.console import Console
from rich.table import Table

app = typer.Typer(help="medveil: privacy-preserving multi-center medical data collaboration.", no_args_is_help=True)
hub_app = typer.Typer(help="Run the hub that relays tasks between researchers and sites.", no_args_is_help=True)
node_app = typer.Typer(help="Create, start and inspect a site's node.", no_args_is_help=True)
study_app = typer.Typer(help="Create, approve and list studies.", no_args_is_help=True)
run_app = typer.Typer(help="Run a federated analysis of a study.", no_args_is_help=True)
audit_app = typer.Typer(help="Check a node's audit log.", no_args_is_help=True)
app.add_typer(hub_app, name="hub")
app.add_typer(node_app, name="node")
app.add_typer(study_app, name="study")
app.add_typer(run_app, name="run")
app.add_typer(audit_app, name="audit")
console = Console()


def _fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(1)


@app.command()
def demo(sites: int = typer.Option(3, min=2, max=10, help="number of hospitals"),
         show_traffic: int = typer.Option(4, help="hub messages to show")) -> None:
    """Three hospitals share a real breast-cancer study (GBSG2); compare federated with pooled results."""
    from medveil.demo import run_demo

    run_demo(console, n_sites=sites, show_traffic=show_traffic)


@app.command()
def keygen(path: Path = typer.Argument(..., help="where to write the private key (PEM)")) -> None:
    """Create an Ed25519 identity (for a researcher) and print its public key."""
    from medveil.crypto.signing import SigningKey

    if path.exists():
        raise _fail(f"{path} exists; refusing to overwrite a key")
    key = SigningKey.generate()
    path.write_bytes(key.to_pem())
    path.chmod(0o600)
    console.print(f"wrote {path}; public key [bold]{key.verify_key.to_text()}[/]")


@hub_app.command("start")
def hub_start(db: str = typer.Option("sqlite:///medveil-hub.db", help="SQLAlchemy URL of the hub's store"),
              host: str = typer.Option("127.0.0.1"), port: int = typer.Option(8700),
              record_traffic: bool = typer.Option(False, help="expose every relayed message at /v1/traffic")) -> None:
    """Serve the hub (FastAPI on uvicorn) until interrupted."""
    import uvicorn

    from medveil.runtime.hub import create_hub_app
    from medveil.runtime.hub_store import HubStore

    store = HubStore(db)
    console.print(f"medveil hub on http://{host}:{port} (store {db.split('@')[-1]})")
    uvicorn.run(create_hub_app(store, record_traffic=record_traffic), host=host, port=port, log_level="warning",
                timeout_graceful_shutdown=2)


@node_app.command("init")
def node_init(directory: Path = typer.Argument(..., help="directory for the site's keys and config"),
              site: str = typer.Option(..., help="the site's name, e.g. hospital_a"),
              hub: str = typer.Option(..., help="the hub's URL")) -> None:
    """Create the site's Ed25519 identity, its steward's key pair and a site.yaml to fill in."""
    from medveil.crypto.signing import SigningKey
    from medveil.runtime.config import SiteConfig, dump_site_config

    directory.mkdir(parents=True, exist_ok=True)
    config_path = directory / "site.yaml"
    if config_path.exists() or (directory / "node.key").exists():
        raise _fail(f"{directory} already holds a node; refusing to overwrite its keys")
    identity, steward = SigningKey.generate(), SigningKey.generate()
    (directory / "node.key").write_bytes(identity.to_pem())
    (directory / "steward.key").write_bytes(steward.to_pem())
    for key_file in ("node.key", "steward.key"):
        (directory / key_file).chmod(0o600)
    (directory / "steward.pub").write_text(steward.verify_key.to_text() + "\n")
    config_path.write_text(dump_site_config(SiteConfig(site=site, hub=hub)))
    console.print(f"created {config_path}, node.key, steward.key (keep it off the node) and steward.pub")
    console.print("add datasets to site.yaml, e.g.\n  datasets:\n    default: {kind: csv, path: cohort.csv}")


@node_app.command("start")
def node_start(config: Path = typer.Option(..., help="site YAML config"),
               quiet: bool = typer.Option(False, help="log warnings only")) -> None:
    """Register with the hub and long-poll it for tasks until interrupted."""
    from medveil.runtime.node import Node

    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(message)s")
    node = Node.from_config_file(config)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        node.register()
        if not quiet:
            console.print(f"node {node.site} polling {node.config.hub}; datasets {node.dataset_names()}")
        node.serve(stop)
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        node.close()


def _exit_on_signal(signum: int, _frame: object) -> None:
    """SIGTERM interrupts a long-poll at once (the handler runs in the main thread)."""
    raise SystemExit(0)


@node_app.command("status")
def node_status(config: Path = typer.Option(..., help="site YAML config")) -> None:
    """Show the site's disclosure policy, approved studies and each study's remaining DP budget."""
    from medveil.runtime.config import load_site_config
    from medveil.runtime.node_store import NodeStore

    site = load_site_config(config)
    console.print(f"[bold]{site.site}[/] hub {site.hub}")
    table = Table("rule", "value", title="disclosure policy")
    for rule, value in site.policy.model_dump().items():
        table.add_row(rule, str(value))
    console.print(table)
    store = NodeStore(site.state_dir / "node.db")
    studies = Table("study", "researcher", "datasets", "secure agg.", "DP rho per release", "DP budget left",
                    title="approved studies")
    for approval in store.approvals():
        spec = approval.spec
        rho = spec.get("dp_rho_per_release")
        left = site.policy.dp_budget_rho - store.budget_spent(spec["id"])
        studies.add_row(spec["id"], spec["researcher"], ", ".join(spec["datasets"]),
                        "on" if spec.get("secure_aggregation", True) else "OFF",
                        "-" if rho is None else f"{rho:g}", f"{left:g} of {site.policy.dp_budget_rho:g}")
    store.close()
    console.print(studies)


@study_app.command("create")
def study_create(spec: Path = typer.Option(..., help="study YAML: id, title, purpose, sites, datasets, analyses"),
                 hub: str = typer.Option(..., help="the hub's URL"),
                 identity: Path = typer.Option(..., help="the researcher's private key (medveil keygen)"),
                 researcher: str = typer.Option(..., help="the researcher's name at the hub")) -> None:
    """Register as researcher (first use) and publish a study for the sites' stewards to approve."""
    from medveil.crypto.signing import SigningKey
    from medveil.runtime.client import HubClient, HubError
    from medveil.runtime.study import StudySpec

    key = SigningKey.from_pem(identity.read_bytes())
    raw = yaml.safe_load(spec.read_text())
    study = StudySpec.model_validate(dict(raw, researcher=researcher, researcher_key=key.verify_key.to_text()))
    client = HubClient(hub, researcher, key)
    try:
        client.register("researcher")
        client.post("/v1/studies", client.seal("study", {"spec": study.model_dump()}, study=study.id))
    except HubError as exc:
        raise _fail(str(exc)) from exc
    finally:
        client.close()
    console.print(f"study [bold]{study.id}[/] published; digest {study.digest()[:16]}; waiting for approvals")


@study_app.command("approve")
def study_approve(study: str = typer.Argument(...), config: Path = typer.Option(..., help="site YAML config"),
                  steward_key: Path = typer.Option(..., help="the steward's private key"),
                  yes: bool = typer.Option(False, "--yes", help="approve without asking")) -> None:
    """As the site's steward: read the study from the hub, check it, sign and store the approval."""
    from medveil.crypto.signing import SigningKey
    from medveil.runtime.node import Node
    from medveil.runtime.study import StudySpec

    node = Node.from_config_file(config)
    try:
        node.register()
        envelope = node.client.study_envelope(study)
        spec = StudySpec.model_validate(envelope.body()["spec"])
        console.print(yaml.safe_dump(spec.model_dump(exclude={"researcher_key"}), sort_keys=False))
        if not yes and not typer.confirm(f"Approve study {study!r} for {node.site}?"):
            raise _fail("not approved")
        node.approve(study, SigningKey.from_pem(steward_key.read_bytes()))
    finally:
        node.close()
    console.print(f"{node.site} approved study [bold]{study}[/]")


@study_app.command("list")
def study_list(hub: str = typer.Option(..., help="the hub's URL")) -> None:
    """List the studies the hub knows and which sites approved them."""
    import httpx

    table = Table("study", "researcher", "title", "sites", "approved by")
    for row in httpx.get(f"{hub}/v1/studies", timeout=30).json():
        table.add_row(row["id"], row["researcher"], row["title"], ", ".join(row["sites"]), ", ".join(row["approved_by"]))
    console.print(table)


def _connect(hub: str, identity: Path, study: str):
    import medveil as mv

    return mv.connect(hub, identity, study)


HubOpt = typer.Option(..., help="the hub's URL")
IdentityOpt = typer.Option(..., help="the researcher's private key")
StudyOpt = typer.Option(..., help="study id")
DataOpt = typer.Option(None, help="dataset name (default: the study's only one)")


def _show(frame, title: str) -> None:
    table = Table(title=title)
    table.add_column(frame.index.name or "")
    for column in frame.columns:
        table.add_column(str(column), justify="right")
    for label, row in frame.iterrows():
        table.add_row(str(label), *[_cell(v) for v in row])
    console.print(table)
    provenance = frame.attrs.get("provenance", {})
    if provenance:
        console.print(f"sites {provenance['sites']}, rows {provenance['rows']}, "
                      f"secure aggregation {'on' if provenance['secure_aggregation'] else 'off'}")


def _cell(value: object) -> str:
    import pandas as pd

    if value is pd.NA or (isinstance(value, float) and value != value):
        return "[dim]suppressed[/]" if value is pd.NA else "–"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _run(action, title: str) -> None:
    from medveil.runtime.session import FederationError

    start = time.monotonic()
    try:
        with console.status(f"running {title} across sites..."):
            frame = action()
    except FederationError as exc:
        raise _fail(str(exc)) from exc
    _show(frame, f"{title} ({time.monotonic() - start:.2f} s)")


@run_app.command("describe")
def run_describe(variables: list[str] = typer.Argument(...), hub: str = HubOpt, identity: Path = IdentityOpt,
                 study: str = StudyOpt, data: Optional[str] = DataOpt) -> None:
    """Pooled n, mean, sd and protected quantiles."""
    with _connect(hub, identity, study) as fed:
        _run(lambda: fed.describe(variables, data=data), "describe")


@run_app.command("crosstab")
def run_crosstab(row: str = typer.Argument(...), col: Optional[str] = typer.Argument(None), hub: str = HubOpt,
                 identity: Path = IdentityOpt, study: str = StudyOpt, data: Optional[str] = DataOpt) -> None:
    """Pooled frequency table with small cells suppressed."""
    with _connect(hub, identity, study) as fed:
        _run(lambda: fed.crosstab(row, col, data=data), "crosstab")


@run_app.command("histogram")
def run_histogram(variable: str = typer.Argument(...), edges: str = typer.Option(..., help="comma-separated edges"),
                  hub: str = HubOpt, identity: Path = IdentityOpt, study: str = StudyOpt,
                  data: Optional[str] = DataOpt) -> None:
    """Pooled histogram over agreed edges."""
    bins = [float(e) for e in edges.split(",")]
    with _connect(hub, identity, study) as fed:
        _run(lambda: fed.histogram(variable, bins, data=data).set_index("left"), "histogram")


@run_app.command("gwas")
def run_gwas(phenotype: str = typer.Argument(..., help="0/1 trait (or quantitative for --test linear)"),
             genotypes: str = typer.Option(..., help="the sites' PLINK dataset name"),
             test: str = typer.Option("allelic", help="allelic | logistic | logistic-score | linear | tdt"),
             covariate: list[str] = typer.Option([], help="a covariate column (repeat the option for more)"),
             maf: float = typer.Option(0.0, help="drop variants with minor allele frequency below"),
             geno: float = typer.Option(1.0, help="drop variants with a missing rate above"),
             hwe: Optional[float] = typer.Option(None, help="drop variants with HWE exact P in controls below"),
             out: Optional[Path] = typer.Option(None, help="write the whole table here (tab-separated)"),
             manhattan: Optional[Path] = typer.Option(None, help="write a Manhattan plot here (PNG)"),
             qq: Optional[Path] = typer.Option(None, help="write a QQ plot here (PNG)"),
             top: int = typer.Option(10, help="how many of the strongest associations to show"),
             hub: str = HubOpt, identity: Path = IdentityOpt, study: str = StudyOpt,
             data: Optional[str] = DataOpt) -> None:
    """Genome-wide association across the sites' genotypes, as PLINK on the pooled data."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    from medveil import gwas_plots
    from medveil.runtime.session import FederationError

    start = time.monotonic()
    with _connect(hub, identity, study) as fed, Progress(
            TextColumn("variants"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task("gwas", total=None)
        try:
            table = fed.gwas(genotypes=genotypes, phenotype=phenotype, data=data, covariates=covariate, test=test,
                             maf=maf, geno=geno, hwe=hwe,
                             progress=lambda done, total: bar.update(task, completed=done, total=total))
        except (FederationError, ValueError) as exc:
            raise _fail(str(exc)) from exc
    if out is not None:
        table.to_csv(out, sep="\t", index=False)
    for path, plot in ((manhattan, gwas_plots.manhattan), (qq, gwas_plots.qq)):
        if path is not None:
            plot(table, path, title=f"{phenotype} ({test})")
    shown = [c for c in table.columns if c not in ("REF", "ALT", "A2", "F_A", "F_U", "F_MISS", "GENO_UNAFF")]
    strongest = table.nsmallest(top, "P")[shown].set_index("ID")
    _show(strongest, f"gwas {test}: {len(table):,} variants, lambda_gc {table.attrs['lambda_gc']:.3f} "
                     f"({time.monotonic() - start:.2f} s)")
    removed = {name: count for name, count in table.attrs["qc_removed"].items() if count}
    if removed:
        console.print(f"removed by quality control: {removed}")
    for path in (out, manhattan, qq):
        if path is not None:
            console.print(f"wrote {path}")


@audit_app.command("verify")
def audit_verify(path: Path = typer.Argument(..., help="a node's audit.jsonl")) -> None:
    """Check every hash link of a node's audit log."""
    from medveil.runtime.audit import AuditError, verify_audit_log

    try:
        count = verify_audit_log(path)
    except AuditError as exc:
        raise _fail(str(exc)) from exc
    console.print(f"[green]intact[/]: {count} entries, every link verified")
