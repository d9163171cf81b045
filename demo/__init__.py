"""`hutong demo`: the Fuxing alliance on this machine, each member with its simulated vendor
systems.

:mod:`~demo.world` prepares the demo folder and starts the seven nodes,
:mod:`~demo.vendors` the vendor HIS, LIS and PACS simulators, :mod:`~demo.scenario`
plays the referral scenario through those systems and checks every step,
:mod:`~demo.run` ties them together and prints the summary and where to look.
"""

from __future__ import annotations

from demo.run import run_demo

__all__ = ["run_demo"]
