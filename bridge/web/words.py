"""Words for clinicians instead of codes: display names of codes from the node's own code maps,
FHIR status and priority words, step events and actors, in Chinese (English on ``?lang=en``).

``Displays`` reads the site maps' ConceptMaps once (``bridge.mapping.sites.load_node_maps``):
every source and target code they list with its display. ``fhirview.text`` asks it when a
coding carries no display of its own, so a department code sent without a name still shows as
its name. Labels for these words register into ``i18n.LABELS`` at import (additive).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from bridge.web.i18n import LABELS, status_name, step_name, t

if TYPE_CHECKING:
    from bridge.node import Node

PRIORITY = {
    "routine": ("普通", "routine"),
    "urgent": ("紧急", "urgent"),
    "asap": ("尽快", "as soon as possible"),
    "stat": ("立即", "immediately"),
}
#: MedicationRequest / ImagingStudy / DiagnosticReport / Observation statuses
RESOURCE_STATUS = {
    "active": ("执行中", "active"),
    "on-hold": ("暂停", "on hold"),
    "cancelled": ("已撤销", "cancelled"),
    "completed": ("已完成", "completed"),
    "entered-in-error": ("录入错误", "entered in error"),
    "stopped": ("已停止", "stopped"),
    "draft": ("草稿", "draft"),
    "unknown": ("未知", "unknown"),
    "registered": ("已登记", "registered"),
    "available": ("可调阅", "available"),
    "preliminary": ("初步", "preliminary"),
    "final": ("最终", "final"),
    "amended": ("已修改", "amended"),
    "corrected": ("已更正", "corrected"),
    "appended": ("已补充", "appended"),
    "partial": ("部分", "partial"),
}
#: referral step events as the history table lists them
EVENT_WORDS = {
    "request": ("提交转诊申请", "referral requested"),
    "received": ("已收到", "received"),
    "accept": ("接收", "accepted"),
    "reject": ("拒绝", "declined"),
    "arrive": ("患者到院", "patient arrived"),
    "cancel": ("申请撤销", "cancellation asked"),
    "cancelled": ("已撤销", "withdrawn"),
    "cancel-refused": ("撤销未获同意", "cancellation refused"),
    "return": ("出院转回", "discharged and returned"),
    "return-received": ("转回已接收", "return received"),
    "consent": ("签署同意", "consent"),
    "schedule": ("预约", "booked"),
    "complete": ("完成", "completed"),
}

LABELS.update(
    {
        "actor_adapter": ("本院系统接口", "local system"),
        "actor_node": ("节点", "node"),
        "actor_cli": ("命令行", "command line"),
        "imaging_fetch": ("调阅影像", "Fetch images"),
        "imaging_viewer": ("在影像浏览器中打开", "Open in viewer"),
        "imaging_fetched": ("已请求调阅", "Fetch requested"),
        "patient_imaging_ImagingStudy": (
            "本院存有该患者的影像检查",
            "Imaging studies of this patient held here",
        ),
        "patient_imaging_DiagnosticReport": (
            "本院存有该患者的影像报告",
            "Imaging reports of this patient held here",
        ),
        "first_page": ("第一页", "First page"),
        "reason_required": ("拒绝或撤销须填写原因", "A reason is required to decline or withdraw"),
    }
)


def _pick(pairs: dict[str, tuple[str, str]], lang: str, code: Any) -> str:
    pair = pairs.get(str(code or ""))
    if pair is None:
        return "" if code is None else str(code)
    return pair[1] if lang == "en" else pair[0]


def priority_name(lang: str, code: Any) -> str:
    return _pick(PRIORITY, lang, code or "routine")


def resource_status(lang: str, code: Any) -> str:
    return _pick(RESOURCE_STATUS, lang, code)


def event_name(lang: str, code: Any) -> str:
    if str(code) in EVENT_WORDS:
        return _pick(EVENT_WORDS, lang, code)
    return step_name(lang, code) if code else ""


def actor_name(lang: str, actor: Any, member_name: Any = None) -> str:
    """``role:clinician`` as 临床医生, ``adapter:his`` as 本院系统接口 his, a member id as its
    name; a person's name (issue 14's accounts) as it is."""
    a = str(actor or "")
    kind, _, rest = a.partition(":")
    if kind == "role" and f"role_{rest}" in LABELS:
        return t(lang, f"role_{rest}")
    if kind == "adapter":
        return f"{t(lang, 'actor_adapter')} {rest}"
    if a == "cli":
        return t(lang, "actor_cli")
    if member_name is not None and kind == a:
        named = member_name(lang, a)
        if named != a:
            return str(named)
    return a


class Displays:
    """(system, code) -> display, from the node's site maps (loaded once, lazily)."""

    def __init__(self, node: Node | None) -> None:
        self.node = node
        self._map: dict[tuple[str, str], str] | None = None
        self._lock = threading.Lock()

    def _load(self) -> dict[tuple[str, str], str]:
        out: dict[tuple[str, str], str] = {}
        if self.node is None:
            return out
        try:
            from bridge.mapping.sites import load_node_maps

            for maps in load_node_maps(self.node.plan):
                for cm in maps.conceptmaps.values():
                    for group in cm.get("group") or []:
                        src, tgt = group.get("source", ""), group.get("target", "")
                        for el in group.get("element") or []:
                            if el.get("display"):
                                out.setdefault((src, str(el.get("code"))), str(el["display"]))
                            for tg in el.get("target") or []:
                                if tg.get("display"):
                                    out.setdefault((tgt, str(tg.get("code"))), str(tg["display"]))
        except Exception:  # noqa: BLE001 - no maps (or a broken one): codes show as codes
            return out
        return out

    def get(self, system: Any, code: Any) -> str | None:
        if self._map is None:
            with self._lock:
                if self._map is None:
                    self._map = self._load()
        return self._map.get((str(system or ""), str(code or "")))


#: the process's node (one node per process); set by ``bridge.web.web_router``
DISPLAYS = Displays(None)


def install(node: Node) -> None:
    global DISPLAYS
    DISPLAYS = Displays(node)


def status_word(lang: str, code: Any) -> str:
    """A Task status through the referral words, else a resource status."""
    word = status_name(lang, code)
    return word if word != (code or "") else resource_status(lang, code)
