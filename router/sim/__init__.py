"""A carrier SMSC simulator that speaks real SMPP 3.4 over TCP.

See :mod:`router.sim.smsc`. Message content is kept only in memory and never logged.
"""

from .smsc import (
    CarrierSimulator,
    ReceivedMessage,
    SimConfig,
    SimStats,
    main,
    run_simulators,
)

__all__ = [
    "CarrierSimulator",
    "ReceivedMessage",
    "SimConfig",
    "SimStats",
    "main",
    "run_simulators",
]
