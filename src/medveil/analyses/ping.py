"""ping: one round that every site answers after all its checks, releasing nothing.

Tells a researcher which sites are up and approve the study, and measures the cost of a
round (signatures, approvals, audit, relay) with no computation in it.
"""

from __future__ import annotations

from typing import Any

from medveil.analyses.base import (
    Aggregated,
    Analysis,
    Finished,
    NextRound,
    Params,
    Release,
    SiteContext,
    register,
)


class PingParams(Params):
    pass


@register
class Ping(Analysis[PingParams]):
    name = "ping"
    Params = PingParams
    releases_sums = False

    def variables(self, params: PingParams) -> list[str]:
        return []

    def local(self, params: PingParams, round_no: int, broadcast: dict[str, Any], context: SiteContext) -> Release:
        return Release(public={"ok": True})

    def global_step(self, params: PingParams, round_no: int, aggregated: Aggregated,
                    state: dict[str, Any]) -> NextRound | Finished:
        return Finished(sorted(aggregated.public))
