"""The hospital side of a node: adapters plugged in by config, and what the node offers them.

``registry`` builds adapters from ``[[adapters]]`` tables through the ``hutong.adapters``
entry-point group; ``host`` is the one object an adapter talks to; ``intake`` makes every
local record's effect happen exactly once (its source key commits with the effect).
The contract itself is documented in :mod:`bridge.local.contract`.
"""
