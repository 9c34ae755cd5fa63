"""Site services end to end: real hub and nodes on loopback HTTP; each site's steward builds a
count_lookup from the site's own table and the researcher asks it through the hub."""

from __future__ import annotations

import pandas as pd
import pytest

import medveil as mv
from medveil.crypto.signing import SigningKey
from medveil.runtime.grid import HubGrid, RefusedError
from medveil.runtime.node import Node
from medveil.runtime.services import query_service, query_step

pytestmark = pytest.mark.e2e

SUPPRESSED = {"count": None, "suppressed": True, "min_count": 5}


def _site(codes: dict[str, int]) -> pd.DataFrame:
    icd10 = [code for code, n in codes.items() for _ in range(n)]
    return pd.DataFrame({"icd10": icd10, "age": [40.0 + i for i in range(len(icd10))]})


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    folder = tmp_path_factory.mktemp("registries")
    tables = {"north": _site({"C18": 9, "C20": 5, "Q87.4": 1}), "south": _site({"C18": 7, "C20": 2, "E11": 6})}
    for site, table in tables.items():
        table.to_csv(folder / f"{site}.csv", index=False)  # a file the site's config names, as deployed
    with mv.Federation.simulate({site: folder / f"{site}.csv" for site in tables}, record_hub_traffic=True,
                                timeout=60) as fed:
        network = fed.network
        spec = network.add_study("lookups", {"default": ["age"]}, services=["count_lookup"])
        for site in spec.sites:
            node = Node.from_config_file(network.workdir / site / "site.yaml")
            try:
                node.build_service("count_lookup", "default", {"key_column": "icd10", "queries_per_day": 6},
                                   SigningKey.from_pem(network.steward_key_path(site).read_bytes()))
            finally:
                node.close()
        fed.lookups = HubGrid(network.researcher, spec)
        yield fed


def _ask(grid: HubGrid, site: str, key: str) -> dict:
    def send(task: str, body: dict) -> dict:
        return grid.exchange(query_step(site, "count_lookup", task, body), timeout=60)[site].body

    return query_service(send, "count_lookup", {"key": key})


def test_each_site_answers_from_its_own_data_and_suppresses_small_counts(federation):
    grid = federation.lookups
    assert _ask(grid, "north", "C18") == {"count": 9, "suppressed": False, "min_count": 5}
    assert _ask(grid, "south", "C18") == {"count": 7, "suppressed": False, "min_count": 5}
    assert _ask(grid, "north", "C20")["count"] == 5
    assert _ask(grid, "south", "C20") == SUPPRESSED  # two patients
    assert _ask(grid, "north", "Q87.4") == SUPPRESSED  # one patient
    assert _ask(grid, "north", "E11") == SUPPRESSED  # none at north; six at south
    assert _ask(grid, "south", "E11")["count"] == 6


def test_a_study_without_the_service_is_refused_through_the_hub(federation):
    spec = federation.network.add_study("no-services", {"default": ["age"]}, services=[])
    with pytest.raises(RefusedError) as caught:
        _ask(HubGrid(federation.network.researcher, spec), "north", "C18")
    assert (caught.value.site, caught.value.rule) == ("north", "service_not_approved")


def test_queries_travel_as_query_steps_and_the_quota_holds(federation):
    grid = federation.lookups
    while True:  # spend what is left of south's daily quota of 6 (the first test used 3)
        try:
            _ask(grid, "south", "C18")
        except RefusedError as exc:
            assert exc.rule == "service_quota_exhausted"
            break
    assert _ask(grid, "north", "C18")["count"] == 9  # north counts its own quota
    traffic = federation.hub_traffic()
    queries = traffic[(traffic["kind"] == "task") & (traffic["phase"] == "query")]
    assert set(queries["analysis"]) == {"service"} and queries["task"].is_unique
    assert len(queries[queries["body"].map(lambda body: body == {"query": {"key": "C18"}})]) >= 6
