"""The relay: change stream and sweeps to a publisher."""

from ._config import RelayConfig
from ._relay import Relay, RelayStats

__all__ = ["Relay", "RelayConfig", "RelayStats"]
