"""ping: one round that every site answers after all its checks, releasing nothing.

Tells a researcher which sites are up and approve the study, and measures the cost of a
round (signatures, approvals, audit, relay) with no computation in it.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from medveil.analyses.base import (
    Aggregated,
    Analysis,
    Finished,
    NextRound,
    Params,
    Release,
    register,
)
from medveil.privacy.disclosure import DisclosurePolicy


class PingParams(Params):
    pass


@register
class Ping(Analysis[PingParams]):
    name = "ping"
    Params = PingParams
    releases_sums = False

    def variables(self, params: PingParams) -> list[str]:
        return []

    def local(self, params: PingParams, round_no: int, broadcast: dict[str, Any], data: pd.DataFrame,
              policy: DisclosurePolicy) -> Release:
        return Release(public={"ok": True})

    def global_step(self, params: PingParams, round_no: int, aggregated: Aggregated,
                    state: dict[str, Any]) -> NextRound | Finished:
        return Finished(sorted(aggregated.public))
