"""The `medveil` command: a thin layer over the runtime and the researcher API."""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

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
service_app = typer.Typer(help="Build and list a site's services (as its steward).", no_args_is_help=True)
pir_app = typer.Typer(help="Build and inspect a site's private variant look-up (variant_profile, SimplePIR).",
                      no_args_is_help=True)
app.add_typer(hub_app, name="hub")
app.add_typer(node_app, name="node")
app.add_typer(study_app, name="study")
app.add_typer(run_app, name="run")
app.add_typer(audit_app, name="audit")
app.add_typer(service_app, name="service")
app.add_typer(pir_app, name="pir")
console = Console()
err_console = Console(stderr=True)


def _fail(message: str) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(1)


def _warn(message: str) -> None:
    err_console.print(f"[bold yellow]warning:[/] {message}")


def _interactive() -> bool:
    import sys

    return sys.stdin.isatty()


def _passphrase_for(path: Path) -> Optional[bytes]:
    """The passphrase to unlock a key file: MEDVEIL_KEY_PASSPHRASE, else a prompt when the key is
    encrypted and someone is at the terminal; warns when the key is stored unencrypted."""
    from medveil.runtime.config import PASSPHRASE_ENV, key_file_is_encrypted, passphrase_from_env

    try:
        encrypted = key_file_is_encrypted(path)
    except OSError as exc:
        raise _fail(f"cannot read private key {path}: {exc.strerror}") from exc
    if not encrypted:
        _warn(f"private key {path} is not encrypted; re-create it with {PASSPHRASE_ENV} set")
        return None
    passphrase = passphrase_from_env()
    if passphrase is None and _interactive():
        passphrase = typer.prompt(f"passphrase for {path}", hide_input=True).encode("utf-8")
    return passphrase


def _open_node(config: Path):
    """The node a site YAML describes, its identity key unlocked; a bad config is a one-line error."""
    from medveil.runtime.config import ConfigError, load_site_config
    from medveil.runtime.node import Node

    try:
        return Node.from_config_file(config, _passphrase_for(load_site_config(config).identity))
    except ConfigError as exc:
        raise _fail(str(exc)) from exc


def _load_key(path: Path):
    """A private key file, checked to be the owner's only and unlocked (see _passphrase_for)."""
    from medveil.runtime.config import KeyFileError, read_private_key

    try:
        return read_private_key(path, _passphrase_for(path))
    except KeyFileError as exc:
        raise _fail(str(exc)) from exc


def _new_passphrase() -> Optional[bytes]:
    """The passphrase for new keys: MEDVEIL_KEY_PASSPHRASE, else asked at a terminal (empty: none)."""
    from medveil.runtime.config import PASSPHRASE_ENV, passphrase_from_env

    passphrase = passphrase_from_env()
    if passphrase is None and _interactive():
        text = typer.prompt("passphrase for the new key(s) (empty: unencrypted)", default="", hide_input=True,
                            confirmation_prompt=True, show_default=False)
        passphrase = text.encode("utf-8") or None
    if passphrase is None:
        _warn(f"writing unencrypted private keys; set {PASSPHRASE_ENV} to encrypt them")
    return passphrase


def _write_key(path: Path, key, passphrase: Optional[bytes]) -> None:
    from medveil.runtime.config import make_private_dir, write_private_key

    if not path.parent.exists():
        make_private_dir(path.parent)
    try:
        write_private_key(path, key, passphrase)
    except FileExistsError as exc:
        raise _fail(f"{path} exists; refusing to overwrite a key") from exc


@app.command()
def demo(sites: int = typer.Option(3, min=2, max=10, help="number of hospitals"),
         show_traffic: int = typer.Option(4, help="hub messages to show")) -> None:
    """Three hospitals share a real breast-cancer study (GBSG2); compare federated with pooled results."""
    from medveil.demo import run_demo

    run_demo(console, n_sites=sites, show_traffic=show_traffic)


@app.command()
def keygen(path: Path = typer.Argument(..., help="where to write the private key (PEM)")) -> None:
    """Create an Ed25519 identity (for a researcher): 0600, encrypted with MEDVEIL_KEY_PASSPHRASE."""
    from medveil.crypto.signing import SigningKey

    if path.exists():
        raise _fail(f"{path} exists; refusing to overwrite a key")
    key = SigningKey.generate()
    _write_key(path, key, _new_passphrase())
    console.print(f"wrote {path}; public key [bold]{key.verify_key.to_text()}[/]")
    console.print(f"fingerprint {key.verify_key.fingerprint()}")


@app.command()
def fingerprint(path: Path = typer.Argument(..., help="a site.yaml, a private key (PEM) or a public key file")) -> None:
    """Print an identity's public key and fingerprint, for a steward to give researchers out of band."""
    from medveil.crypto.signing import VerifyKey
    from medveil.runtime.config import ConfigError, load_site_config

    encryption = None
    try:
        if path.suffix in (".yaml", ".yml"):
            site = load_site_config(path)
            label, key = site.site, _load_key(site.identity).verify_key
            if site.encryption_key is not None:
                encryption = _encryption_public_key(site.encryption_key)
        elif path.read_bytes().lstrip().startswith(b"-----BEGIN"):
            label, key = str(path), _load_key(path).verify_key
        else:
            label, key = str(path), VerifyKey.from_text(path.read_text().strip())
    except (ConfigError, OSError, ValueError) as exc:
        raise _fail(f"cannot read an identity from {path}: {exc}") from exc
    console.print(f"{label}\n  public key  {key.to_text()}\n  fingerprint {key.fingerprint()}")
    if encryption is not None:
        console.print(f"  encryption  {encryption}  (pin it in a study's site_encryption_keys)")


def _encryption_public_key(path: Path) -> str:
    """The public half of a site's X25519 encryption key file (checked and unlocked as identity keys are)."""
    from medveil.crypto.sealed import encryption_public_key
    from medveil.runtime.config import KeyFileError, read_encryption_key

    try:
        return encryption_public_key(read_encryption_key(path, _passphrase_for(path)))
    except KeyFileError as exc:
        raise _fail(str(exc)) from exc


OperatorKeyOpt = typer.Option(Path("medveil-hub-operator.key"),
                              help="the operator's private key, which signs invitations (created if missing)")


@hub_app.command("start")
def hub_start(db: str = typer.Option("sqlite:///medveil-hub.db", help="SQLAlchemy URL of the hub's store"),
              host: str = typer.Option("127.0.0.1"), port: int = typer.Option(8700),
              operator_key: Path = OperatorKeyOpt,
              record_traffic: bool = typer.Option(False, help="expose every relayed message at /v1/traffic"),
              retention_days: float = typer.Option(30.0, help="delete the relayed traffic of tasks finished "
                                                              "(or idle) this many days ago")) -> None:
    """Serve the hub (FastAPI on uvicorn) until interrupted; parties enrol with `medveil hub invite`."""
    import uvicorn

    from medveil.crypto.signing import SigningKey
    from medveil.runtime.hub import create_hub_app
    from medveil.runtime.hub_store import HubStore

    if not operator_key.exists():
        _write_key(operator_key, SigningKey.generate(), _new_passphrase())
        console.print(f"created the operator key {operator_key}")
    operator = _load_key(operator_key).verify_key
    store = HubStore(db)
    console.print(f"medveil hub on http://{host}:{port} (store {db.split('@')[-1]}); operator key fingerprint "
                  f"{operator.fingerprint()}")
    uvicorn.run(create_hub_app(store, operator_key=operator, record_traffic=record_traffic,
                               retention_s=retention_days * 86400), host=host, port=port,
                log_level="warning", timeout_graceful_shutdown=2)


@hub_app.command("invite")
def hub_invite(party: str = typer.Argument(..., help="the party's id at the hub, e.g. hospital_a"),
               role: str = typer.Option(..., help="site | researcher"),
               operator_key: Path = OperatorKeyOpt,
               days: float = typer.Option(7.0, min=0.0, help="days until the invitation expires"),
               key: Optional[str] = typer.Option(None, help="bind it to this public key (the party's "
                                                            "`medveil fingerprint` output)")) -> None:
    """As the hub's operator: print an invitation for one party to register (once) under its id."""
    from medveil.crypto.signing import VerifyKey
    from medveil.runtime.auth import make_invitation
    from medveil.runtime.hub import ROLES
    from medveil.runtime.study import NAME_PATTERN

    if role not in ROLES:
        raise _fail(f"role must be one of {', '.join(ROLES)}")
    if re.fullmatch(NAME_PATTERN, party) is None:
        raise _fail(f"{party!r} is not a valid party id")
    if key is not None:
        try:
            VerifyKey.from_text(key)
        except ValueError as exc:
            raise _fail("--key must be a public key (medveil fingerprint prints it)") from exc
    operator = _load_key(operator_key)
    typer.echo(make_invitation(operator, party, role, time.time() + days * 86400, key))


@node_app.command("init")
def node_init(directory: Path = typer.Argument(..., help="directory for the site's keys and config"),
              site: str = typer.Option(..., help="the site's name, e.g. hospital_a"),
              hub: str = typer.Option(..., help="the hub's URL"),
              invitation: Optional[str] = typer.Option(None, help="the hub operator's invitation (medveil hub "
                                                                  "invite); needed to register once"),
              steward_key: Optional[Path] = typer.Option(None, help="where to write the steward's private key "
                                                                    "(default: DIRECTORY-steward.key, beside "
                                                                    "the node directory, to be moved off the host)")) -> None:
    """Create the site's identity (node.key), its encryption key (encryption.key, for payloads
    sealed to the site), its steward's key pair and a site.yaml to fill in.

    The node directory (0700) holds only the steward's public key; the steward's private key goes
    to a separate file for the steward to move off the node host. Keys are 0600, encrypted with
    MEDVEIL_KEY_PASSPHRASE when it is set."""
    from medveil.crypto.sealed import generate_encryption_key
    from medveil.crypto.signing import SigningKey
    from medveil.runtime.config import (
        SiteConfig,
        dump_site_config,
        make_private_dir,
        write_encryption_key,
        write_private_file,
    )
    from medveil.runtime.study import NAME_PATTERN

    if re.fullmatch(NAME_PATTERN, site) is None:
        raise _fail(f"{site!r} is not a valid site name")
    config_path = directory / "site.yaml"
    if config_path.exists() or (directory / "node.key").exists() or (directory / "encryption.key").exists():
        raise _fail(f"{directory} already holds a node; refusing to overwrite its keys")
    steward_path = steward_key or directory.parent / f"{directory.name}-steward.key"
    if steward_path.exists():
        raise _fail(f"{steward_path} exists; refusing to overwrite a key")
    make_private_dir(directory)
    make_private_dir(directory / "state")
    passphrase = _new_passphrase()
    identity, steward = SigningKey.generate(), SigningKey.generate()
    _write_key(directory / "node.key", identity, passphrase)
    _write_key(steward_path, steward, passphrase)
    encryption_private, encryption_public = generate_encryption_key()
    write_encryption_key(directory / "encryption.key", encryption_private, passphrase)
    (directory / "steward.pub").write_text(steward.verify_key.to_text() + "\n")
    write_private_file(config_path, dump_site_config(SiteConfig(
        site=site, hub=hub, invitation=invitation, encryption_key=Path("encryption.key"))).encode())
    console.print(f"created {config_path}, node.key, encryption.key and steward.pub (the steward's public key)")
    console.print(f"[bold]steward's private key: {steward_path}[/]: move it off the node host; the steward "
                  "needs it only to approve studies (medveil study approve --steward-key)")
    console.print(f"identity fingerprint of {site} (give it to researchers): {identity.verify_key.fingerprint()}")
    console.print(f"encryption key of {site} (for a study's site_encryption_keys): {encryption_public}")
    console.print("add datasets to site.yaml, e.g.\n  datasets:\n    default: {kind: csv, path: cohort.csv}")


@node_app.command("register")
def node_register(config: Path = typer.Option(..., help="site YAML config")) -> None:
    """Register the site's identity at the hub with the operator's invitation (in site.yaml)."""
    from medveil.runtime.client import HubError

    node = _open_node(config)
    try:
        created = node.client.register("site")["created"]
    except HubError as exc:
        raise _fail(str(exc)) from exc
    finally:
        node.close()
    console.print(f"{node.site} {'registered' if created else 'was already registered'} at {node.config.hub}")


@node_app.command("start")
def node_start(config: Path = typer.Option(..., help="site YAML config"),
               quiet: bool = typer.Option(False, help="log warnings only")) -> None:
    """Register with the hub and long-poll it for tasks until interrupted."""


    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(asctime)s %(message)s")
    node = _open_node(config)
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
    """Show the site's disclosure policy, approved studies and the DP budget each study's researcher has left."""
    from medveil.runtime.config import load_site_config
    from medveil.runtime.node_store import NodeStore, dp_account
    from medveil.runtime.study import StudySpec

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
        left = site.policy.dp_budget_rho - store.budget_spent(dp_account(spec["researcher"]))
        datasets = StudySpec.model_validate(spec).datasets_for(site.site)
        studies.add_row(spec["id"], spec["researcher"], ", ".join(datasets),
                        "on" if spec.get("secure_aggregation", True) else "OFF",
                        "-" if rho is None else f"{rho:g}", f"{left:g} of {site.policy.dp_budget_rho:g}")
    store.close()
    console.print(studies)


@study_app.command("create")
def study_create(spec: Path = typer.Option(..., help="study YAML: id, title, purpose, sites, site_keys, datasets, "
                                                     "analyses"),
                 hub: str = typer.Option(..., help="the hub's URL"),
                 identity: Path = typer.Option(..., help="the researcher's private key (medveil keygen)"),
                 researcher: str = typer.Option(..., help="the researcher's name at the hub"),
                 invitation: Optional[str] = typer.Option(None, help="the hub operator's invitation, for the "
                                                                     "first registration")) -> None:
    """Register as researcher (first use) and publish a study for the sites' stewards to approve.

    `site_keys` in the YAML pins each site's identity: its public key, or the fingerprint its
    steward gave you (then the key the hub serves is taken only if its fingerprint matches)."""
    from pydantic import ValidationError

    from medveil.runtime.client import HubClient, HubError
    from medveil.runtime.study import StudySpec

    key = _load_key(identity)
    raw = yaml.safe_load(spec.read_text())
    if not isinstance(raw, dict):
        raise _fail(f"{spec} must hold a map of study fields")
    client = HubClient(hub, researcher, key, invitation=invitation)
    try:
        site_keys = _pinned_site_keys(client, raw.get("sites"), raw.get("site_keys"))
        study = StudySpec.model_validate(dict(raw, researcher=researcher, researcher_key=key.verify_key.to_text(),
                                              site_keys=site_keys))
        client.register("researcher")
        client.post_study(client.seal("study", {"spec": study.model_dump()}, study=study.id))
    except ValidationError as exc:
        raise _fail(f"invalid study {spec}:\n{exc}") from exc
    except HubError as exc:
        raise _fail(str(exc)) from exc
    finally:
        client.close()
    console.print(f"study [bold]{study.id}[/] published; digest {study.digest()[:16]}; waiting for approvals")


def _pinned_site_keys(client, sites: object, given: object) -> dict[str, str]:
    """Each site's public key from the study YAML: a key as written, or the hub's key for the site
    once its fingerprint matches the one written (a mismatch refuses the study)."""
    from medveil.crypto.signing import normalise_fingerprint
    from medveil.runtime.client import HubError

    if not isinstance(sites, list) or not isinstance(given, dict) or set(map(str, given)) != set(map(str, sites)):
        raise _fail("the study YAML must give site_keys for exactly its sites: each site's public key or the "
                    "fingerprint its steward gave you (medveil fingerprint site.yaml)")
    keys = {}
    for site, text in given.items():
        expected = normalise_fingerprint(str(text))
        if expected is None:
            keys[str(site)] = str(text)
            continue
        try:
            served = client.hub_public_key(str(site))
        except HubError as exc:
            raise _fail(f"cannot fetch the key of {site!r} from the hub: {exc.detail}") from exc
        if normalise_fingerprint(served.fingerprint()) != expected:
            raise _fail(f"the key the hub serves for {site!r} does not match the fingerprint you were given; "
                        "study not created (ask the site's steward, and tell the hub's operator)")
        keys[str(site)] = served.to_text()
    return keys


@study_app.command("approve")
def study_approve(study: str = typer.Argument(...), config: Path = typer.Option(..., help="site YAML config"),
                  steward_key: Path = typer.Option(..., help="the steward's private key"),
                  yes: bool = typer.Option(False, "--yes", help="approve without asking")) -> None:
    """As the site's steward: read the study from the hub, check it, sign and store the approval."""
    from medveil.crypto.signing import VerifyKey
    from medveil.runtime.node import Refusal
    from medveil.runtime.study import StudySpec

    node = _open_node(config)
    try:
        node.register()
        envelope = node.client.study_envelope(study)
        spec = StudySpec.model_validate(envelope.body()["spec"])
        shown = spec.model_dump(exclude={"researcher_key", "site_keys"})
        shown["site_fingerprints"] = {site: VerifyKey.from_text(text).fingerprint()
                                      for site, text in spec.site_keys.items()}
        console.print(yaml.safe_dump(shown, sort_keys=False))
        if not yes and not typer.confirm(f"Approve study {study!r} for {node.site}?"):
            raise _fail("not approved")
        node.approve(study, _load_key(steward_key))
    except Refusal as exc:
        raise _fail(f"[{exc.rule}] {exc}") from exc
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


@run_app.command("lookup")
def run_lookup(variant: list[str] = typer.Option(..., help="chrom:pos:REF:ALT (repeat for up to 64)"),
               site: list[str] = typer.Option([], help="a site to ask (repeatable; default: every site)"),
               cache_dir: Path = typer.Option(Path("~/.medveil/pir"), help="where the sites' hints are kept "
                                                                           "between runs (one download per build)"),
               hub: str = HubOpt, identity: Path = IdentityOpt, study: str = StudyOpt) -> None:
    """Private variant look-up: carriers by phenotype group at each site, the variants hidden from them (PIR)."""
    from medveil.crypto.pir import PirError
    from medveil.runtime.session import FederationError

    with _connect(hub, identity, study) as fed:
        for name in site or fed.sites:
            start = time.monotonic()
            try:
                with console.status(f"private look-up at {name}..."):
                    table = fed.private_lookup(name, variant, cache_dir=cache_dir)
            except (FederationError, PirError, ValueError) as exc:
                raise _fail(str(exc)) from exc
            _show_lookup(table, f"{name}: build {table.attrs['build'][:12]}, min count {table.attrs['min_count']} "
                                f"({time.monotonic() - start:.2f} s)")
            console.print(f"[dim]{table.attrs['note']}[/]")


def _show_lookup(frame, title: str) -> None:
    """A look-up's answer with one column per variant: "no record" for a variant not found, a
    suppressed cell as such."""
    import pandas as pd

    fields = [c for c in frame.columns if c not in ("variant", "found", "suppressed")]
    table = Table("field", *frame["variant"], title=title)
    table.add_row("found", *["yes" if found else "no record" for found in frame["found"]])
    for field in fields:
        table.add_row(field, *["-" if not found else "[dim]suppressed[/]" if value is pd.NA else str(value)
                               for found, value in zip(frame["found"], frame[field])])
    console.print(table)


@audit_app.command("verify")
def audit_verify(path: Path = typer.Argument(..., help="a node's audit.jsonl")) -> None:
    """Check every hash link of a node's audit log."""
    from medveil.runtime.audit import AuditError, verify_audit_log

    try:
        count = verify_audit_log(path)
    except AuditError as exc:
        raise _fail(str(exc)) from exc
    console.print(f"[green]intact[/]: {count} entries, every link verified")


@service_app.command("build")
def service_build(name: str = typer.Argument(..., help="a registered service, e.g. count_lookup"),
                  config: Path = typer.Option(..., help="site YAML config"),
                  dataset: str = typer.Option(..., help="the site's dataset to build it from"),
                  steward_key: Path = typer.Option(..., help="the steward's private key"),
                  option: list[str] = typer.Option([], help="a build option KEY=VALUE (repeatable), e.g. "
                                                            "key_column=icd10 or queries_per_day=200")) -> None:
    """As the site's steward: build (or rebuild) a service from the site's own data."""
    site, manifest = _build_service(config, name, dataset, _build_options(option), steward_key)
    console.print(f"{site} built service [bold]{name}[/] from {dataset}: {manifest['summary']}")


def _build_options(option: list[str], **fixed: str) -> dict[str, str]:
    """--option KEY=VALUE pairs as a dict, on top of `fixed` ones."""
    options = dict(fixed)
    for item in option:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise _fail(f"--option {item!r} is not KEY=VALUE")
        options[key.strip()] = value
    return options


def _build_service(config: Path, name: str, dataset: str, options: dict[str, str],
                   steward_key: Path) -> tuple[str, dict[str, Any]]:
    """Build a site service as its steward; returns (site, manifest), refusals as clean CLI errors."""
    from medveil.crypto.signing import SignatureError
    from medveil.runtime.services import ServiceError

    node = _open_node(config)
    try:
        with console.status(f"building {name}..."):
            return node.site, node.build_service(name, dataset, options, _load_key(steward_key))
    except ServiceError as exc:
        raise _fail(f"[{exc.rule}] {exc}") from exc
    except SignatureError as exc:
        raise _fail(str(exc)) from exc
    finally:
        node.close()


@service_app.command("list")
def service_list(config: Path = typer.Option(..., help="site YAML config")) -> None:
    """Show the registered services and those built at this site."""
    from medveil.runtime.services import service_names

    node = _open_node(config)
    try:
        built = {manifest["service"]: manifest for manifest in node.services.manifests()}
    finally:
        node.close()
    table = Table("service", "dataset", "built", "options", "summary", title=f"services at {node.site}")
    for name in service_names():
        manifest = built.get(name)
        if manifest is None:
            table.add_row(name, "-", "not built", "", "")
        elif "error" in manifest:
            table.add_row(name, "-", "[red]corrupt[/]", "", manifest["error"])
        else:
            when = time.strftime("%Y-%m-%d %H:%M", time.gmtime(manifest["built_at"]))
            table.add_row(name, manifest["dataset"], f"{when} UTC", str(manifest["options"]), str(manifest["summary"]))
    console.print(table)


PIR_SERVICE = "variant_profile"


@pir_app.command("build")
def pir_build(config: Path = typer.Option(..., help="site YAML config"),
              dataset: str = typer.Option(..., help="the phenotype table (sample ids and 0/1 group columns)"),
              genotypes: str = typer.Option(..., help="the site's PLINK dataset (normalised with bcftools norm "
                                                      "-f ref.fa -m -any before conversion)"),
              steward_key: Path = typer.Option(..., help="the steward's private key"),
              option: list[str] = typer.Option([], help="a build option KEY=VALUE (repeatable), e.g. "
                                                        "group_columns=HP_0001250,HP_0001263 or iid_column=IID")) -> None:
    """As the site's steward: build (or rebuild) the variant_profile service and its PIR hint."""
    site, manifest = _build_service(config, PIR_SERVICE, dataset, _build_options(option, genotypes=genotypes),
                                    steward_key)
    summary = manifest["summary"]
    console.print(f"{site} built [bold]{PIR_SERVICE}[/] from {dataset} + {genotypes}: {summary['records']:,} "
                  f"records of {summary['variants']:,} variants, build {summary['build'][:12]}")


@pir_app.command("status")
def pir_status(config: Path = typer.Option(..., help="site YAML config")) -> None:
    """Show the site's look-up database: layout, m, p, sizes, salt, build id, and whether its data changed."""
    from medveil.runtime.node import Refusal

    node = _open_node(config)
    try:
        status = node.services.status(PIR_SERVICE)
    except Refusal as exc:
        raise _fail(f"[{exc.rule}] {exc}") from exc
    finally:
        node.close()
    summary = status["summary"]
    table = Table("field", "value", title=f"{PIR_SERVICE} at {node.site}")
    rows = [("build", summary["build"]), ("built", time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(status["built_at"]))),
            ("dataset", status["dataset"]), ("genotypes", status["options"].get("genotypes", "")),
            ("stale", "yes: " + ", ".join(status["changed"]) + " changed; rebuild" if status["stale"] else "no"),
            ("records", f"{summary['records']:,} of {summary['variants']:,} variants"),
            ("samples", f"{summary['samples']:,}"), ("groups", ", ".join(summary["groups"]) or "-"),
            ("min count", str(summary["min_count"])),
            ("layout", f"{summary['rows']:,} rows x {summary['slots']} slots of 64 B per column"),
            ("m (columns)", f"{summary['m']:,}"), ("p", str(summary["p"])), ("salt", str(summary["salt"])),
            ("hint", f"{summary['hint_bytes']:,} B"), ("query", f"{summary['query_bytes']:,} B"),
            ("answer", f"{summary['answer_bytes']:,} B"), ("database", f"{summary['db_bytes']:,} B")]
    for field, value in rows:
        table.add_row(field, value)
    console.print(table)
