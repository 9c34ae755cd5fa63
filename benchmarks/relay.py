"""A real hub with a registered researcher and site clients but no nodes, for benchmarks that
time the transport itself: sites' replies are posted directly, as a node would post them."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from medveil.crypto.signing import SigningKey
from medveil.runtime.client import HubClient
from medveil.runtime.servers import HubServer
from medveil.runtime.study import StudySpec
from medveil.runtime.wire import Envelope


@dataclass
class Relay:
    researcher: HubClient
    sites: dict[str, HubClient]
    study: StudySpec

    def round(self, task: str, step: int, reply_body: Callable[[str], dict[str, Any]],
              body: dict[str, Any] | None = None) -> list[Envelope]:
        """Post a task step, post every site's reply, fetch and verify the replies as the researcher."""
        names = list(self.sites)
        self.researcher.post("/v1/messages", self.researcher.seal(
            "task", body or {}, study=self.study.id, task=task, step=step, analysis=self.study.analyses[0],
            dataset="default", recipients=names))
        for name, client in self.sites.items():
            client.post("/v1/messages", client.seal("reply", reply_body(name), status="ok", study=self.study.id,
                                                    task=task, step=step))
        replies = self.researcher.replies(task, step, wait=60)
        for envelope in replies:
            envelope.verify(self.researcher.public_key(envelope.sender))
        return replies


@contextmanager
def relay(workdir: str | Path, site_names: list[str], analysis: str) -> Iterator[Relay]:
    hub = HubServer(f"sqlite:///{workdir}/hub.db").start()
    try:
        def enrolled(party: str, role: str) -> HubClient:
            key = SigningKey.generate()
            client = HubClient(hub.url, party, key, invitation=hub.invite(party, role, key.verify_key.to_text()))
            client.register(role)
            return client

        researcher = enrolled("researcher", "researcher")
        sites = {name: enrolled(name, "site") for name in site_names}
        study = StudySpec(id="bench", researcher="researcher", researcher_key=researcher.key.verify_key.to_text(),
                          sites=site_names, site_keys={n: c.key.verify_key.to_text() for n, c in sites.items()},
                          datasets={"default": []}, analyses=[analysis])
        researcher.post("/v1/studies", researcher.seal("study", {"spec": study.model_dump()}, study=study.id))
        yield Relay(researcher, sites, study)
    finally:
        hub.stop()
