"""Sample slips shared by the HIS and slip-mapping tests (Fuxing's codes, Yuetan's patient)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from adapters.slips import LabResult, Prescription, ReturnSlip


def return_slip(**kw: Any) -> ReturnSlip:
    """转回单 from Fuxing after discharge: two drugs, three lab lines (one without a flag)."""
    return replace(
        ReturnSlip(
            slip_no="YTZZ20261120001",
            discharge=True,
            diagnosis_code="FXZD0101",
            diagnosis_name="原发性高血压",
            course="入院后调整降压方案，血压平稳",
            advice="继续氨氯地平 5mg qd，两周后社区复查血压",
            doctor="张主任",
            written_at="2026-11-25T09:00:00+08:00",
            prescriptions=[
                Prescription("FX-0101", "苯磺酸氨氯地平片 5mg", "5 mg", "qd", 14),
                Prescription("FX-0103", "硝苯地平控释片 30mg", "30mg", "qd", 28),
            ],
            results=[
                LabResult("FXL-GLU", "葡萄糖", "8.9", "mmol/L", "H", "3.9-6.1"),
                LabResult("FXL-CREA", "肌酐", "72", "μmol/L", "N", "44-133"),
                LabResult("FXL-HBA1C", "糖化血红蛋白", "7.20", "%", "", ""),
            ],
        ),
        **kw,
    )
