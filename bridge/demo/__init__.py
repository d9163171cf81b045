"""`hutong demo`: the Fuxing alliance on this machine, each member with its simulated vendor
systems.

:mod:`~bridge.demo.world` prepares the demo folder and starts the seven nodes,
:mod:`~bridge.demo.vendors` the vendor HIS, LIS and PACS simulators, :mod:`~bridge.demo.scenario`
plays the referral scenario through those systems and checks every step,
:mod:`~bridge.demo.run` ties them together and prints the summary and where to look.
"""

from __future__ import annotations

from bridge.demo.run import run_demo

__all__ = ["run_demo"]
