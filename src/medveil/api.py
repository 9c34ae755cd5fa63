"""The researcher's Python API: `Federation` and `connect`.

Importing it loads no server code: the loopback hub and nodes of `Federation.simulate` (uvicorn,
FastAPI, SQLAlchemy) and the in-process nodes of `Federation.in_process` are imported when one
is started.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from medveil.analyses.cox import CoxResults
from medveil.analyses.glm_results import GLMResults
from medveil.analyses.pca import PCAResult
from medveil.analyses.survival import KaplanMeierResult, LogrankResult
from medveil.crypto.signing import SigningKey, VerifyKey, is_encrypted_pem
from medveil.runtime.client import HubClient
from medveil.runtime.config import PASSPHRASE_ENV, read_private_key
from medveil.runtime.session import ResearcherSession, RunOutcome
from medveil.runtime.study import StudySpec

if TYPE_CHECKING:
    from medveil.analyses.fl import FLResult
    from medveil.analyses.psi import PsiResult
    from medveil.runtime.grid import Grid
    from medveil.runtime.simulation import (
        InProcessNetwork,
        LocalNetwork,
        Policies,
        SiteData,
    )

DEFAULT_RUNS_DIR = Path("~/.medveil/runs")


class Federation:
    """A study across sites, run from Python; every method returns pooled-equivalent results.

    Results are pandas DataFrames whose `attrs["provenance"]` records the sites that took part,
    rows used per site, whether secure aggregation was on and the sites' audit entry ids.
    """

    def __init__(self, session: ResearcherSession, network: LocalNetwork | InProcessNetwork | None = None):
        """A federation over `session`; `network`, the simulated one it runs on (closed with it)."""
        self.session = session
        self.network = network

    @classmethod
    def simulate(cls, sites: Mapping[str, SiteData], *, record_hub_traffic: bool = False,
                 policy: Policies = None, timeout: float = 60.0, processes: bool = False,
                 workdir: str | Path | None = None, hub_db: str | None = None, secure_aggregation: bool = True,
                 secagg_threshold: int | None = None, allow_dropouts: bool = False,
                 runs_dir: str | Path | None = None, roles: Mapping[str, str] | None = None,
                 models: Sequence[str] | None = None) -> Federation:
        """Start a real hub and one real node per site on loopback HTTP (threads, or processes).

        The study set-up is the one `in_process` uses (runtime/simulation.py): a site is one
        table (DataFrame or CSV/Parquet/PLINK path; dataset "default") or a dict {dataset name:
        table}; every site gets its own identity, encryption and steward keys, registers on an
        invitation, and its steward approves one study over every variable. `policy`: one
        disclosure policy, or one per site. Secure aggregation is on unless turned off here,
        which the study records and every result's provenance reports. A site that does not
        answer within `timeout` fails the run with an error naming it, unless `allow_dropouts`
        lets a secure first round go on without it (down to the threshold; the provenance lists
        who took part). Party `roles` ({site: "label_holder" | "feature_holder" | "dealer" ...})
        go into the study, and each site is then approved for its own tables' columns only; a
        site given as {} holds no table (a dealer). `models` lists the model recipes
        ("name@version") the study may train (default: every one registered here). The hub keeps its state in `hub_db` (SQLAlchemy URL; a SQLite file in
        the work directory by default) and, with `record_hub_traffic`, every message it relayed
        (`hub_traffic`). Runs are checkpointed in `runs_dir` (default: `runs/` in the work
        directory) and resumable with `resume`.

            >>> with Federation.simulate({"a": frame_a, "b": frame_b}) as fed:  # doctest: +SKIP
            ...     fed.describe("age")
        """
        from medveil.runtime.simulation import start_local_network

        network = start_local_network(sites, workdir=workdir, record_hub_traffic=record_hub_traffic,
                                      policy=policy, processes=processes, hub_db=hub_db,
                                      secure_aggregation=secure_aggregation, secagg_threshold=secagg_threshold,
                                      roles=roles, models=None if models is None else list(models))
        return cls._over(network, network.researcher, timeout=timeout, allow_dropouts=allow_dropouts,
                         runs_dir=network.workdir / "runs" if runs_dir is None else runs_dir)

    @classmethod
    def in_process(cls, sites: Mapping[str, SiteData], *, policy: Policies = None, timeout: float = 60.0,
                   workdir: str | Path | None = None, secure_aggregation: bool = True,
                   secagg_threshold: int | None = None, allow_dropouts: bool = False,
                   runs_dir: str | Path | None = None, roles: Mapping[str, str] | None = None,
                   models: Sequence[str] | None = None) -> Federation:
        """The study set-up of `simulate` (the same sites, keys, study, stewards' approvals and
        every node guard; the same keywords bar the hub's), with each step handed to the nodes in this process by
        an InProcessGrid: no hub, no HTTP; for fast tests. Results equal `simulate`'s to the last
        digit. `hub_traffic` lists every envelope the grid handed over or got back. Runs are not
        checkpointed unless `runs_dir` is given.

            >>> with Federation.in_process({"a": frame_a, "b": frame_b}) as fed:  # doctest: +SKIP
            ...     fed.glm("death ~ age", family="binomial")
        """
        from medveil.runtime.simulation import start_in_process

        network = start_in_process(sites, workdir=workdir, policy=policy, secure_aggregation=secure_aggregation,
                                   secagg_threshold=secagg_threshold, roles=roles,
                                   models=None if models is None else list(models))
        return cls._over(network, network.grid, timeout=timeout, allow_dropouts=allow_dropouts, runs_dir=runs_dir)

    @classmethod
    def _over(cls, network: LocalNetwork | InProcessNetwork, grid: Grid | HubClient, *, timeout: float,
              allow_dropouts: bool, runs_dir: str | Path | None) -> Federation:
        """A federation whose session runs over `grid` and which closes `network` with it."""
        try:
            session = ResearcherSession(grid, network.study, timeout=timeout, allow_dropouts=allow_dropouts,
                                        runs_dir=runs_dir)
        except BaseException:
            network.close()
            raise
        return cls(session, network)

    @property
    def study(self) -> StudySpec:
        """The study every run belongs to (signed by the researcher, approved by the stewards)."""
        return self.session.study

    @property
    def sites(self) -> list[str]:
        """The study's sites."""
        return list(self.study.sites)

    def close(self) -> None:
        """Wait for the last results to be recorded, then close the session and any simulated network."""
        self.session.close()
        if self.network is not None:
            self.network.close()
            self.network = None

    def __enter__(self) -> Federation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _dataset(self, data: str | None) -> str:
        """The dataset a call names, or the study's only one."""
        if data is not None:
            return data
        if len(self.study.datasets) == 1:
            return next(iter(self.study.datasets))
        raise ValueError(f"the study has several datasets {sorted(self.study.datasets)}: say which with data=")

    def run(self, analysis: str, data: str | None = None, **params: Any) -> RunOutcome:
        """Run any registered analysis by name; returns its result and provenance."""
        return self.session.run(analysis, params, self._dataset(data))

    def _result(self, analysis: str, data: str | None, **params: Any) -> Any:
        """Run and return the result carrying its provenance (see _with_provenance)."""
        return _with_provenance(self.run(analysis, data, **params))

    def resume(self, task_id: str) -> Any:
        """Continue a run whose process was killed, from its last checkpoint, to the result the
        original call would have returned (equal to the last digit, with its provenance). What
        the journal holds is re-sent (the hub takes a copy it already has for delivered). A run
        a site refused is final and cannot be resumed.

            >>> fed = mv.connect(url, "researcher.key", "study-1")  # doctest: +SKIP
            >>> task = fed.runs()["task"].iloc[0]  # the glm() run a crash cut short
            >>> fit = fed.resume(task)  # the GLMResults that glm() would have returned
        """
        return _with_provenance(self.session.resume(task_id))

    def runs(self) -> pd.DataFrame:
        """This study's unfinished runs, oldest first: one row per run with its task id (for
        `resume`), analysis, dataset, the round it reached and its next step.

            >>> for task in fed.runs()["task"]:  # doctest: +SKIP
            ...     print(fed.resume(task).provenance["rounds"])
        """
        return pd.DataFrame([{"task": run.id, "analysis": run.analysis, "dataset": run.dataset, "round": run.round,
                              "step": run.step} for run in self.session.unfinished()],
                            columns=["task", "analysis", "dataset", "round", "step"])

    def ping(self, data: str | None = None) -> list[str]:
        """One no-op round through every site's checks; returns the sites that answered."""
        return self.run("ping", data).result

    def describe(self, variables: str | Sequence[str], data: str | None = None,
                 quantiles: Sequence[float] | None = None) -> pd.DataFrame:
        """n, mean, sd and protected quantiles per numeric variable; never minima or maxima."""
        names = [variables] if isinstance(variables, str) else list(variables)
        extra = {} if quantiles is None else {"quantiles": list(quantiles)}
        return self._result("describe", data, variables=names, **extra)

    def crosstab(self, row: str, col: str | None = None, data: str | None = None) -> pd.DataFrame:
        """Pooled frequency table; small cells are missing and marked in `attrs["suppressed"]`."""
        return self._result("crosstab", data, row=row, col=col)

    def histogram(self, variable: str, edges: Sequence[float], data: str | None = None) -> pd.DataFrame:
        """Pooled counts over bin edges fixed up front; small bins suppressed and marked."""
        return self._result("histogram", data, variable=variable, edges=[float(e) for e in edges])

    def glm(self, formula: str, family: str = "gaussian", data: str | None = None, offset: str | None = None,
            weights: str | None = None, max_iter: int = 100, tol: float = 1e-8) -> GLMResults:
        """Generalized linear model equal to statsmodels' GLM on the pooled rows (distributed IRLS).

        `offset` and `weights` name columns (weights are prior weights: statsmodels' var_weights).
        With an offset the null deviance is not computed (NaN)."""
        return self._result("glm", data, formula=formula, family=family, offset=offset, weights=weights,
                           max_iter=max_iter, tol=tol)

    def psi(self, left: str, right: str, on: str = "patient_id", reveal: str = "both", data: str | None = None,
            id_kind: str = "plain", invalid: str = "error") -> PsiResult:
        """Private set intersection of the `on` IDs of two sites (ECDH-PSI; no ID leaves a site).

        `reveal`: "both" (each site learns which of its rows are shared), "left" (only `left` does)
        or "size" (`left` learns only how many). Both sites normalise IDs as `id_kind` says
        ("plain", or "cn_resident_id": GB 11643 check digit); an invalid ID is refused naming its
        row, or skipped with invalid="skip" (the count skipped is public). Unless only the size is
        revealed, each learning site keeps the matched rows in an agreed order, and the result's
        `alignment` (this run's task id) names them for a later `vertical_glm(aligned=...)`.
        Refusals: psi_set_too_small, psi_intersection_too_small, invalid_id, site_not_in_study."""
        outcome = self.run("psi", data, left=left, right=right, on=on, reveal=reveal, id_kind=id_kind,
                           invalid=invalid)
        result = _with_provenance(outcome)
        return result if reveal == "size" else dataclasses.replace(result, alignment=outcome.provenance["task"])

    def distinct_patients(self, on: str = "patient_id", data: str | None = None, id_kind: str = "plain",
                          invalid: str = "error", counter: str | None = None) -> pd.DataFrame:
        """Distinct patients over every site but dealers (the registry de-duplication count), by a ring of
        commutative blindings: rows 1..N sites, column `count` of patients seen at exactly that
        many sites (small counts missing, marked in `suppressed`); attrs["distinct"] the total.
        `counter` (default the first site in sorted order) sees how the sites' blinded sets
        overlap, never an ID."""
        return self._result("distinct_patients", data, on=on, sites=sorted(self.study.data_sites()), id_kind=id_kind,
                            invalid=invalid, counter=counter)

    def vertical_glm(self, formula: str, family: str = "binomial", label_site: str | None = None,
                     feature_site: str | None = None, dealer_site: str | None = None, aligned: Any = None,
                     data: str | None = None, max_iter: int = 50, tol: float = 1e-10) -> GLMResults:
        """Logistic or linear model over columns split between a label holder (the response, the
        intercept, its columns) and a feature holder (its columns), by exact Newton with every
        cross term secret-shared; equal to statsmodels' GLM on the joined rows. A dealer site (no
        data) hands out correlated randomness and evaluates the link on the linear predictor in a
        shuffled order under masks, so neither data site sees a per-row value of the other; the
        label holder computes each Newton step itself and refuses a researcher's beta that is not
        it. The researcher learns what a pooled GLM reveals; the dealer the unordered linear
        predictor at each iterate (docs/vertical.md). Each term lies wholly at one site. The sites
        default to the study's roles (label_holder, feature_holder, dealer); `aligned` is a
        `psi(...)` result or its alignment id (None: the two tables are already in one row order).
        Returns VerticalGLMResults (GLMResults plus `owner`, coefficient -> site)."""
        def by_role(site: str | None, role: str) -> str:
            if site is not None:
                return site
            holders = [name for name in self.sites if self.study.role_of(name) == role]
            if len(holders) != 1:
                raise ValueError(f"say which site is the {role} ({len(holders)} sites hold that role in the study)")
            return holders[0]

        label, feature, dealer = (by_role(label_site, "label_holder"), by_role(feature_site, "feature_holder"),
                                  by_role(dealer_site, "dealer"))
        dataset = self._dataset(data)
        columns = {site: list(self.study.datasets_for(site).get(dataset, [])) for site in (label, feature)}
        alignment = getattr(aligned, "alignment", aligned)
        return self._result("vertical_glm", dataset, formula=formula, family=family, label_site=label,
                            feature_site=feature, dealer_site=dealer, columns=columns, aligned=alignment,
                            max_iter=max_iter, tol=tol)

    def train(self, model: str = "mlp", *, target: str, features: Sequence[str] = (), data: str | None = None,
              image: str | None = None, classes: int = 2, version: str = "1", rounds: int = 10,
              local_epochs: int = 1, batch_size: int | None = None, lr: float = 0.1, algorithm: str = "fedavg",
              mu: float = 0.0, hyper: Mapping[str, Any] | None = None, validation_fraction: float = 0.2,
              sample_fraction: float = 1.0, dp: Mapping[str, float] | None = None, seed: int = 0,
              progress: bool | Callable[[int, int], None] = False) -> FLResult:
        """Federated training (FedAvg, or FedProx with `mu`) of a model recipe installed at the sites
        and approved by the study ("name@version" in `study.models`): the sites send no code and
        run none of the researcher's; `hyper` is checked against the recipe's schema at each site.

        Tabular models read the numeric `features`; image models (cnn, resnet18) read the image
        files named in the labels column `image` of an image-folder dataset. The `target` holds
        0/1 (`classes`=2) or labels 0..classes-1. Each site holds out a seeded
        `validation_fraction` of its rows; every round it evaluates the global weights there
        (pooled loss, accuracy, AUC, calibration, securely summed) and, when the round's seeded
        draw of `sample_fraction` of the sites picks it, trains `local_epochs` of plain SGD
        (`batch_size` None: full batch); the new global weights are the row-weighted mean of the
        drawn sites' weights, summed under secure aggregation. `dp` ({"noise_multiplier",
        "max_grad_norm", "delta"}) trains with DP-SGD (Opacus) and charges each site's budget
        for this researcher; a training the budget cannot pay is refused (`dp_budget_exhausted`).
        `seed` fixes the initial weights, the split, the draws and the shuffling. `progress`:
        True shows a progress bar (Rich) with the last validation AUC and loss; a callable
        gets (rounds done, rounds in all). Returns FLResult (weights, `predict_proba`,
        `state_dict`, `history` and `plot`, `calibration`, `privacy`, provenance); needs torch
        at the sites and here. See docs/fl.md."""
        params = dict(model=model, version=version, features=list(features), image=image, target=target,
                      classes=classes, hyper=dict(hyper or {}), rounds=rounds, local_epochs=local_epochs,
                      batch_size=batch_size, lr=lr, algorithm=algorithm, mu=mu,
                      validation_fraction=validation_fraction, sample_fraction=sample_fraction,
                      dp=None if dp is None else dict(dp), seed=seed)
        dataset = self._dataset(data)
        if progress is True:
            return _with_provenance(_train_with_bar(self.session, params, dataset))
        callback = None if progress is False or progress is None else _variant_progress(progress)
        return _with_provenance(self.session.run("fl_train", params, dataset, progress=callback))

    def coxph(self, duration: str, event: str, covariates: Sequence[str], ties: str = "efron",
              strata: str | None = None, data: str | None = None, time_unit: float = 1.0,
              max_time: float = 36_500.0) -> CoxResults:
        """Cox proportional-hazards model by exact distributed Newton, equal to a pooled fit on the
        times as each site coarsens them (no step rests on fewer than min_cell_count patients)."""
        return self._result("coxph", data, duration=duration, event=event, covariates=list(covariates), ties=ties,
                            strata=strata, time_unit=time_unit, max_time=max_time)

    def kaplan_meier(self, duration: str, event: str, by: str | None = None, data: str | None = None,
                     time_unit: float = 1.0, max_time: float = 36_500.0, alpha: float = 0.05) -> KaplanMeierResult:
        """Kaplan-Meier curves with exponential-Greenwood intervals, equal to lifelines on the pooled
        rows with the times as each site coarsens them; no minimum or maximum time shows. Durations
        beyond `max_time` are censored at `max_time`."""
        return self._result("kaplan_meier", data, duration=duration, event=event, by=by, time_unit=time_unit,
                           max_time=max_time, alpha=alpha)

    def logrank(self, duration: str, event: str, group: str, data: str | None = None, time_unit: float = 1.0,
                max_time: float = 36_500.0) -> LogrankResult:
        """Log-rank test across the levels of `group` (multivariate for more than two)."""
        return self._result("logrank", data, duration=duration, event=event, by=group, time_unit=time_unit,
                           max_time=max_time)

    def gwas(self, genotypes: str, phenotype: str, data: str | None = None, covariates: Sequence[str] = (),
             test: str = "allelic", *, iid: str = "IID", maf: float = 0.0, geno: float = 1.0,
             hwe: float | None = None, hardy: bool = False, batch_size: int | None = None,
             progress: Callable[[int, int], None] | None = None) -> pd.DataFrame:
        """Genome-wide association over PLINK filesets at each site, as PLINK on the pooled data.

        `genotypes` names each site's PLINK dataset, `data` its phenotype table (joined on `iid`).
        `test`: "allelic" (with trend, frequencies and missingness, as plink1.9 --assoc/--model),
        "logistic" (Wald, as plink2 --glm), "logistic-score" (one null fit, a score test per SNP)
        or "linear" (quantitative phenotype, as plink2 --glm); binary phenotypes are 0/1.
        `maf`/`geno`/`hwe` filter variants as PLINK's options of those names; `hardy=True`
        adds the Hardy-Weinberg exact test in controls. `progress(done, total)` follows the
        variants processed. The table's attrs hold lambda_gc, the variant-agreement report and
        the QC tallies; plot it with `medveil.gwas_plots.manhattan` / `qq`."""
        params = dict(genotypes=genotypes, phenotype=phenotype, covariates=list(covariates), test=test, iid=iid,
                      maf=maf, geno=geno, hwe=hwe, hardy=hardy, batch_size=batch_size)
        outcome = self.session.run("gwas", params, self._dataset(data),
                                   progress=None if progress is None else _variant_progress(progress))
        return _with_provenance(outcome)

    def pca(self, genotypes: str, components: int = 10, data: str | None = None, **options: Any) -> PCAResult:
        """Principal components of the pooled genotypes, as plink2 --pca meanimpute on the pooled fileset.

        `genotypes` names each site's PLINK dataset, `data` the table whose `iid` column lists the
        samples. `options`: iid, maf, oversampling, max_iter, tolerance, block_size, seed. The
        result holds the GRM's eigenvalues and the variant loadings; sample scores never leave a
        site, which computes its own with `PCAResult.project`."""
        return self._result("pca", data, genotypes=genotypes, components=components, **options)

    def query(self, site: str, service: str, **query: Any) -> dict[str, Any]:
        """Ask one site's service one query and return its answer. The study must list the
        service and the site's steward must have built it (`medveil service build`); the
        query is checked against the service's schema here (ValueError) and again at the site,
        whose refusal (e.g. `service_quota_exhausted`) raises RefusedError.

            >>> fed.query("hospital_a", "count_lookup", key="C18")  # doctest: +SKIP
            {'count': 9, 'suppressed': False, 'min_count': 5}
        """
        from medveil.runtime.services import query_service, query_step

        def send(task: str, body: dict[str, Any]) -> dict[str, Any]:
            step = query_step(site, service, task, body)
            return self.session.grid.exchange(step, timeout=self.session.timeout)[site].body

        return query_service(send, service, query)

    def beacon(self, variant: str, granularity: str = "boolean", *, genotypes: str, data: str | None = None,
               iid: str = "IID") -> dict[str, Any]:
        """Does any site hold `variant` ("chrom:pos:REF:ALT"), and how many carriers? GA4GH Beacon v2
        style: {"exists": bool} for granularity "boolean", {"count": int} for "count" (the sum of
        each site's ALT carriers among the samples its table `data` lists in its PLINK IID column,
        `iid` = "IID" or "iid", no other; a site's count of 1..min_cell_count-1, or one whose
        complement among its samples is, read as 0; 0: no site holds at least that many).
        `genotypes` names each site's PLINK dataset. Every query costs one of the researcher's
        total budget of variant queries at each site (shared with `private_lookup`); past it the
        sites refuse with `query_budget_exhausted` (RefusedError). See docs/pir.md.

            >>> fed.beacon("1:12345:A:G", genotypes="geno", data="cohort")  # doctest: +SKIP
            {'exists': True}
        """
        from medveil.analyses.beacon import Beacon

        result = self.run(Beacon.name, data, variant=variant, granularity=granularity, genotypes=genotypes,
                          iid=iid).result
        return dict(result)

    def private_lookup(self, site: str, variants: Sequence[str], *, service: str = "variant_profile",
                       cache_dir: str | Path | None = None) -> pd.DataFrame:
        """Carrier counts of up to 64 variants ("chrom:pos:REF:ALT") at one site, fetched by
        SimplePIR so that the site never learns which variants were asked (runtime/pir_service.py).

        The site's hint (its public parameters and the ~64 MiB hint, once per build) is fetched on
        first use and kept in memory, and under `cache_dir` when given (a rebuilt service refuses
        the old build, and the new hint is fetched once). Then one batched query carries one vector
        per distinct variant; each costs one of the researcher's total budget of variant queries
        at the site (shared with `beacon`). Returns one row per variant: `found` (False: the site
        holds no record, absent or fewer carriers than its minimum), carriers, hom_alt, genotyped
        and one column per phenotype group (suppressed or not found: missing), and `suppressed`
        (some cell of the record was suppressed; attrs["suppressed"] says which). Each answer
        decodes a whole column of the site's database, ~192 records of other variants too, all
        disclosure-checked aggregates: attrs["note"] says so.

            >>> fed.private_lookup("hospital_a", ["1:12345:A:G"])  # doctest: +SKIP
        """
        from medveil.analyses.beacon import parse_variant
        from medveil.crypto import pir
        from medveil.runtime.grid import RefusedError
        from medveil.runtime.pir_service import MAX_BATCH

        keys = [parse_variant(str(v)) for v in variants]
        distinct = list(dict.fromkeys(keys))
        if not 1 <= len(distinct) <= MAX_BATCH:
            raise ValueError(f"a look-up asks for 1 to {MAX_BATCH} distinct variants")
        view = self._pir_view(site, service, cache_dir)
        try:
            records = self._pir_answer(site, service, view, distinct)
        except RefusedError as exc:
            if exc.rule != "pir_build_changed":
                raise
            view = self._pir_view(site, service, cache_dir, stale=view["build"])
            records = self._pir_answer(site, service, view, distinct)
        groups = list(view["groups"])
        rows, hidden = [], []
        for key in keys:
            record = records[key]
            cells = [None] * (2 + len(groups)) if record is None else [record["hom_alt"], *record["groups"]]
            rows.append({"variant": key, "found": record is not None,
                         "carriers": None if record is None else record["total"],
                         "hom_alt": cells[0], "genotyped": None if record is None else record["genotyped"],
                         **dict(zip(groups, cells[1:]))})
            hidden.append([record is not None and cell is None for cell in cells[:1 + len(groups)]])
        table = pd.DataFrame(rows, columns=["variant", "found", "carriers", "hom_alt", "genotyped", *groups])
        for column in ["carriers", "hom_alt", "genotyped", *groups]:
            table[column] = table[column].astype("Int64")
        suppressed = pd.DataFrame(hidden, columns=["hom_alt", *groups], dtype=bool)
        table["suppressed"] = suppressed.any(axis=1).to_numpy()
        table.attrs.update({
            "site": site, "service": service, "build": view["build"], "min_count": view["min_count"],
            "groups": groups, "scheme": pir.SCHEME, "queries": len(distinct), "suppressed": suppressed,
            "note": (f"each answer decodes a whole column of {site}'s database (up to "
                     f"{view['layout']['slots']} records of other variants, all disclosure-checked aggregates); "
                     f"not found = no record: the variant is absent or has fewer than {view['min_count']} "
                     "carriers there"),
        })
        return table

    def _pir_view(self, site: str, service: str, cache_dir: str | Path | None, stale: str | None = None
                  ) -> dict[str, Any]:
        """The site's PIR client and public layout for its current build: from memory, else from
        `cache_dir`, else fetched (the hint request is audited and limited per day at the site).
        `stale`: a build the site refused; it is dropped and the hint fetched anew."""
        import threading

        import numpy as np

        from medveil.crypto import pir
        from medveil.runtime.wire import WireError, pack_body, unpack_body

        lock = self.__dict__.setdefault("_pir_lock", threading.Lock())
        with lock:
            views = self.__dict__.setdefault("_pir_views", {})
            view = views.get((site, service))
            if view is not None and view["build"] != stale:
                return view
            path = None if cache_dir is None else \
                Path(cache_dir).expanduser() / self.study.id / f"{site}.{service}.hint"
            reply = None
            if path is not None and path.exists():
                try:
                    reply = unpack_body(path.read_bytes(), 1 << 31)
                except (OSError, WireError):
                    reply = None
                if reply is not None and reply.get("build") == stale:
                    reply = None
            if reply is None:
                reply = self.query(site, service, op="hint")
                if path is not None:
                    from medveil.runtime.config import make_private_dir, write_private_file

                    make_private_dir(path.parent)
                    path.unlink(missing_ok=True)
                    write_private_file(path, pack_body(reply))
            params = pir.PirParams.from_dict(reply.get("params"))
            hint = reply.get("hint")
            if not isinstance(hint, np.ndarray) or hint.dtype != np.uint32:
                raise pir.PirError(f"{site} sent no uint32 hint")
            view = {"build": str(reply.get("build")), "client": pir.PirClient(params, hint),
                    **_pir_reply_layout(site, params, reply)}
            views[(site, service)] = view
            return view

    def _pir_answer(self, site: str, service: str, view: dict[str, Any], keys: list[str]
                    ) -> dict[str, dict[str, Any] | None]:
        """One batched answer query for `keys` (one fresh query vector each); each key's record
        found in its decoded column, or None."""
        import numpy as np

        from medveil.crypto import pir, pir_keyword

        client, layout = view["client"], view["layout"]
        salt, m = int(layout["salt"]), int(layout["m"])
        states, vectors = [], []
        for key in keys:
            state, vector = client.query(pir_keyword.bucket_and_tag(key, salt, m)[0])
            states.append(state)
            vectors.append(vector.astype("<u4").tobytes())
        reply = self.query(site, service, op="answer", build=view["build"], queries=vectors)
        answers = reply.get("answers")
        if not isinstance(answers, np.ndarray) or answers.dtype != np.uint32 or answers.shape[0] != len(keys):
            raise pir.PirError(f"{site} answered {len(keys)} queries with something else")
        return {key: pir_keyword.find_in_column(client.recover(state, row), key, salt)
                for key, state, row in zip(keys, states, answers)}

    def hub_traffic(self) -> pd.DataFrame:
        """Every message the hub relayed, decoded: exactly what the operator can see (for an
        in-process federation, every envelope its grid handed to a node or got back)."""
        relayed = getattr(self.session.grid, "relayed", None)
        if relayed is None:
            raise TypeError(f"a {type(self.session.grid).__name__} keeps no record of the traffic it relayed")
        rows = []
        for envelope in relayed():
            header = envelope.header
            rows.append({
                "kind": header["kind"], "sender": header["sender"], "task": header.get("task"),
                "step": header.get("step"), "phase": header.get("phase"), "round": header.get("round"),
                "analysis": header.get("analysis"), "status": header.get("status"),
                "bytes": len(envelope.body_bytes), "body": envelope.body(),
            })
        return pd.DataFrame(rows)


def _pir_reply_layout(site: str, params: Any, reply: dict[str, Any]) -> dict[str, Any]:
    """The layout, groups and min count of a site's hint reply, checked against its PIR
    parameters before any query is made (PirError naming the site otherwise): a server that lies
    about the column count or the salt could make which vectors the client sends, or whether it
    sends any, depend on the keys asked."""
    import re
    from numbers import Integral

    from medveil.crypto import pir, pir_keyword

    def whole(value: Any) -> bool:
        return isinstance(value, Integral) and not isinstance(value, bool)

    layout, groups, minimum = reply.get("layout"), reply.get("groups"), reply.get("min_count")
    if not isinstance(reply.get("build"), str) or not re.fullmatch(r"[0-9a-f]{64}", reply["build"]):
        raise pir.PirError(f"{site} sent a malformed build id")
    if not isinstance(layout, dict) or set(layout) != {"m", "salt", "slots", "record_bytes", "records"} \
            or not all(whole(v) for v in layout.values()):
        raise pir.PirError(f"{site} sent a malformed record layout")
    if layout["m"] != params.cols or layout["record_bytes"] != pir_keyword.RECORD_BYTES \
            or not 1 <= layout["slots"] <= pir_keyword.DEFAULT_SLOTS \
            or layout["slots"] * pir_keyword.RECORD_BYTES != params.rows \
            or not 0 <= layout["salt"] < 1 << 64 or not 0 <= layout["records"] <= layout["m"] * layout["slots"]:
        raise pir.PirError(f"{site}'s record layout does not match its PIR parameters: refused before any query")
    if not isinstance(groups, list) or len(groups) > pir_keyword.MAX_GROUPS \
            or not all(isinstance(g, str) and g for g in groups) or len(set(groups)) != len(groups):
        raise pir.PirError(f"{site} sent malformed group names")
    if not whole(minimum) or not 1 <= minimum <= pir_keyword.MAX_COUNT:
        raise pir.PirError(f"{site} sent a malformed minimum count")
    return {"layout": {k: int(v) for k, v in layout.items()}, "groups": list(groups), "min_count": int(minimum)}


def _with_provenance(outcome: RunOutcome) -> Any:
    """The result as the Federation methods return it: a table with `attrs["provenance"]`, a
    (frozen) result object with its `provenance` field set, or the bare result (e.g. ping's list)."""
    result = outcome.result
    if isinstance(result, pd.DataFrame):
        result.attrs["provenance"] = outcome.provenance
        return result
    if dataclasses.is_dataclass(result) and any(f.name == "provenance" for f in dataclasses.fields(result)):
        return dataclasses.replace(result, provenance=outcome.provenance)
    return result


def _train_with_bar(session: ResearcherSession, params: dict[str, Any], dataset: str) -> RunOutcome:
    """Run fl_train under a Rich progress bar, one step per round, its text the last round's
    pooled validation AUC and loss (and training loss) as the researcher receives them."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from medveil.analyses.fl import round_summary

    with Progress(TextColumn("fl_train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TextColumn("{task.description}")) as bar:
        task = bar.add_task("", total=None)

        def observe(round_no: int, aggregated: Any) -> None:
            bar.update(task, description=round_summary(aggregated.sums, noisy=params["dp"] is not None))

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return session.run("fl_train", params, dataset, progress=_variant_progress(advance), observe=observe)


def _variant_progress(callback: Callable[[int, int], None]) -> Callable[[int, tuple[int, int] | None], None]:
    def report(round_no: int, done: tuple[int, int] | None) -> None:
        if done is not None:
            callback(*done)
    return report


def connect(url: str, identity: str | Path | SigningKey, study: str, *, timeout: float = 60.0,
            allow_dropouts: bool = False, passphrase: bytes | None = None,
            runs_dir: str | Path | None = None, sync_runs: bool = False) -> Federation:
    """Reach a deployed hub as the researcher who owns `study` (identity: PEM key file or key).

    Runs are checkpointed in `runs_dir` (default ~/.medveil/runs), so that one whose process was
    killed continues with `Federation.resume(task_id)` (`Federation.runs()` lists them);
    `sync_runs=True` fsyncs every checkpoint too, so runs also survive an OS crash or power cut.

    A key file must be private to its owner; an encrypted one is unlocked with `passphrase` or
    MEDVEIL_KEY_PASSPHRASE. Sites are verified against the keys pinned in the study (which the
    researcher signed), never against the keys the hub serves."""
    if isinstance(identity, SigningKey):
        key = identity
    else:
        key = read_private_key(Path(identity), passphrase)
        if not is_encrypted_pem(Path(identity).read_bytes()):
            warnings.warn(f"private key {identity} is not encrypted; re-create it with {PASSPHRASE_ENV} set",
                          UserWarning, stacklevel=2)
    client = HubClient(url, "", key)
    try:
        envelope = client.study_envelope(study)
        spec = StudySpec.model_validate(envelope.body()["spec"])
        envelope.verify(VerifyKey.from_text(spec.researcher_key))
    except BaseException:
        client.close()
        raise
    if spec.researcher_key != key.verify_key.to_text():
        client.close()
        raise PermissionError(f"this identity is not the researcher of study {study!r} ({spec.researcher})")
    client.party = spec.researcher
    client.pin(spec.site_keys)
    return Federation(ResearcherSession(client, spec, timeout=timeout, allow_dropouts=allow_dropouts,
                                        runs_dir=DEFAULT_RUNS_DIR.expanduser() if runs_dir is None else runs_dir,
                                        sync_runs=sync_runs))
