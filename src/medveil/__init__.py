"""medveil: privacy-preserving multi-center medical data collaboration.

Raw patient data stays at each hospital; researchers get results equal to a pooled analysis.
"""

from medveil.api import Federation, connect
from medveil.runtime.session import FederationError, RefusedError, SiteTimeoutError

__all__ = ["Federation", "FederationError", "RefusedError", "SiteTimeoutError", "connect"]
__version__ = "0.1.0"
