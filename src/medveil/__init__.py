"""medveil: privacy-preserving multi-center medical data collaboration.

Raw patient data stays at each hospital; researchers get results equal to a pooled analysis.

The public names below load on first use (PEP 562), so `import medveil` stays light: it loads
no server code (no web framework, no database layer) until a name that needs it is touched.

- `connect(url, identity, study)`: a `Federation` over a running hub, as a researcher.
- `Federation`: runs analyses across a study's sites (`Federation.simulate` starts a local network).
- `DisclosurePolicy`: the disclosure thresholds a site enforces (used by `Federation.simulate`).
- `FederationError`: base of the errors a federated run raises; `RefusedError` (a site refused,
  with `site` and `rule`), `SiteTimeoutError` (sites did not answer), `AnalysisFailed` (the pooled
  sums do not allow the analysis), `SecureAggregationError` (too few sites for the secure sum).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "connect": "medveil.api",
    "Federation": "medveil.api",
    "DisclosurePolicy": "medveil.privacy.disclosure",
    "FederationError": "medveil.runtime.session",
    "RefusedError": "medveil.runtime.session",
    "SiteTimeoutError": "medveil.runtime.session",
    "AnalysisFailed": "medveil.runtime.session",
    "SecureAggregationError": "medveil.runtime.session",
}

__all__ = ["AnalysisFailed", "DisclosurePolicy", "Federation", "FederationError", "RefusedError",
           "SecureAggregationError", "SiteTimeoutError", "connect"]


def __getattr__(name: str) -> Any:
    """Load a public name from its module the first time it is asked for."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'medveil' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
