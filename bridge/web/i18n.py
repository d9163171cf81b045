"""UI labels for the local web pages: Chinese first, English on ``?lang=en`` (kept in a cookie).

Names of steps, kinds and pilot diseases come from ``bridge.referral.codes`` so the pages and
the FHIR resources never disagree; only page chrome lives here.
"""

from __future__ import annotations

from bridge.referral.codes import KINDS, PILOT_DISEASES, STEPS

LANGS = ("zh", "en")
LANG_COOKIE = "hutong_lang"

LABELS: dict[str, tuple[str, str]] = {
    # chrome
    "app": ("互通 转诊与数据交换", "Hutong referral & exchange"),
    "login": ("登录", "Log in"),
    "logout": ("退出", "Log out"),
    "token": ("访问令牌", "Access token"),
    "token_help": ("请输入本院站点配置中对应角色的令牌", "Enter your role's token from the site config"),
    "bad_token": ("令牌无效", "Unknown token"),
    "role": ("角色", "Role"),
    "role_clinician": ("临床医生", "Clinician"),
    "role_it": ("信息科", "IT"),
    "role_auditor": ("审计员", "Auditor"),
    "forbidden": ("无权访问", "Forbidden"),
    "forbidden_text": ("当前角色无权查看此页面。", "Your role may not open this page."),
    "not_found": ("未找到", "Not found"),
    "error": ("操作失败", "Action failed"),
    "back": ("返回", "Back"),
    "none": ("无", "None"),
    "node": ("本节点", "This node"),
    # referrals
    "referrals": ("转诊", "Referrals"),
    "inbox": ("收到的转诊（本院为接收方）", "Inbox (we receive)"),
    "outbox": ("发出的转诊（本院为转出方）", "Outbox (we refer)"),
    "kind": ("类型", "Kind"),
    "status": ("状态", "Status"),
    "step": ("环节", "Step"),
    "updated": ("更新时间", "Updated"),
    "created": ("创建时间", "Created"),
    "green": ("绿色通道", "Green channel"),
    "peer": ("对方机构", "Partner"),
    "from": ("转出机构", "Referred by"),
    "to": ("接收机构", "Referred to"),
    "open": ("查看", "Open"),
    "detail": ("转诊详情", "Referral detail"),
    "patient": ("患者", "Patient"),
    "gender": ("性别", "Gender"),
    "birth": ("出生日期", "Birth date"),
    "reason": ("转诊原因", "Reason"),
    "notes": ("备注", "Notes"),
    "priority": ("优先级", "Priority"),
    "slip_no": ("单号", "Slip no."),
    "acceptance": ("接诊信息", "Acceptance slip"),
    "return_slip": ("转回资料", "Return slip"),
    "documents": ("病历文书", "Clinical documents"),
    "reports": ("检验检查报告", "Reports"),
    "item": ("项目", "Item"),
    "value": ("结果", "Value"),
    "unit": ("单位", "Unit"),
    "range": ("参考范围", "Reference range"),
    "flag": ("提示", "Flag"),
    "meds": ("用药", "Medications"),
    "dosage": ("用法用量", "Dosage"),
    "insurance": ("医保转诊备案号", "Insurance referral no."),
    "history": ("流转记录", "History"),
    "actor": ("操作者", "Actor"),
    "actions": ("操作", "Actions"),
    "accept": ("接收", "Accept"),
    "reject": ("拒绝", "Reject"),
    "arrive": ("患者已到院", "Patient arrived"),
    "cancel": ("撤销转诊", "Cancel referral"),
    "bed": ("床位", "Bed"),
    "department": ("科室", "Department"),
    "doctor": ("接诊医生", "Doctor"),
    "appointment": ("预约时间", "Appointment time"),
    "reason_text": ("原因", "Reason"),
    "print": ("打印单据", "Print slip"),
    "slip_referral": ("转诊单", "Referral slip"),
    "slip_accept": ("接诊单", "Acceptance slip"),
    "slip_return": ("转回单", "Return slip"),
    "signature": ("医师签名", "Physician signature"),
    "date": ("日期", "Date"),
    # audit
    "audit": ("交换审计日志", "Exchange audit log"),
    "chain": ("审计链校验", "Audit chain"),
    "verified": ("已验证", "verified"),
    "broken": ("校验失败", "BROKEN"),
    "records": ("条记录", "records"),
    "checkpoints": ("个签名检查点", "signed checkpoints"),
    "since": ("起始时间", "Since"),
    "until": ("截止时间", "Until"),
    "utc_hint": ("时间按 UTC 解释（可带时区）", "times are UTC unless an offset is given"),
    "action": ("动作", "Action"),
    "outcome": ("结果", "Outcome"),
    "patient_hash": ("患者哈希", "Patient hash"),
    "filter": ("筛选", "Filter"),
    "export": ("导出", "Export"),
    "seq": ("序号", "Seq"),
    "at": ("时间", "Time"),
    "thread": ("会话", "Thread"),
    "packet": ("数据包", "Packet"),
    "message": ("说明", "Message"),
    # it
    "it": ("信息科运维", "IT operations"),
    "queues": ("发送队列（按对方机构）", "Outbound queues per partner"),
    "oldest": ("最久等待(秒)", "Oldest waiting (s)"),
    "inbound": ("接收队列", "Inbound queue"),
    "count": ("数量", "Count"),
    "quarantine": ("隔离区", "Quarantine"),
    "source": ("来源", "Source"),
    "code": ("代码", "Code"),
    "sender": ("发送方", "Sender"),
    "replay": ("重新处理", "Replay"),
    "replay_result": ("重新处理结果", "Replay result"),
    "rules": ("交换规则", "Exchange rules"),
    "kinds": ("数据类型", "Kinds"),
    "senders": ("发送方", "Senders"),
    "recipients": ("接收方", "Recipients"),
    "reminders": ("超时提醒", "Reminders"),
    "reminded": ("提醒时间", "Reminded at"),
    "yes": ("是", "yes"),
    "no": ("否", "no"),
}


def pick_lang(query: str | None, cookie: str | None) -> str:
    for v in (query, cookie):
        if v in LANGS:
            return v  # type: ignore[return-value]
    return "zh"


def t(lang: str, key: str) -> str:
    zh, en = LABELS[key]
    return en if lang == "en" else zh


def step_name(lang: str, code: str | None) -> str:
    s = STEPS.get(code or "")
    if s is None:
        return code or ""
    return s.en if lang == "en" else s.zh


def kind_name(lang: str, code: str | None) -> str:
    k = KINDS.get(code or "")
    if k is None:
        return code or ""
    return k.en if lang == "en" else k.zh


def pilot_name(lang: str, code: str | None) -> str:
    p = PILOT_DISEASES.get(code or "")
    if p is None:
        return code or ""
    return p[1] if lang == "en" else p[0]


STATUS = {  # FHIR Task.status as shown next to the alliance step
    "draft": ("草稿", "draft"), "requested": ("已申请", "requested"),
    "received": ("已收到", "received"), "accepted": ("已接收", "accepted"),
    "rejected": ("已拒绝", "rejected"), "in-progress": ("诊疗中", "in progress"),
    "cancelled": ("已撤销", "cancelled"), "completed": ("已完成", "completed"),
}


def status_name(lang: str, code: str | None) -> str:
    pair = STATUS.get(code or "")
    if pair is None:
        return code or ""
    return pair[1] if lang == "en" else pair[0]
