"""One HL7 v2 toolkit for every v2 speaker (the LIS, the HL7 HIS, the PACS adapter's RIS reader).

:mod:`.charset` (MSH-18 table, decode before split), :mod:`.fields` (parse, typed readers,
escapes, nulls, DTM, MSH-2 and version checks), :mod:`.build` (writing values and segments),
:mod:`.ack` (AA/AE/AR with MSA/ERR, reading a peer's ACK), :mod:`.mllp` (framing, limits,
timeouts, TLS, rate limit, listener and sender), :mod:`.errors`.
"""
