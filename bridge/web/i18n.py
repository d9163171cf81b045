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
    "token_help": (
        "请输入本院站点配置中对应角色的令牌",
        "Enter your role's token from the site config",
    ),
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
    "full_verify_at": ("全链校验时间", "whole chain recomputed at"),
    "since_full": ("其后新增记录已校验", "records added since, checked now"),
    "verify_full_now": ("立即全链校验", "Recompute the whole chain now"),
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
    "overdue": ("仅超时未接收", "Overdue only (not accepted in time)"),
    "yes": ("是", "yes"),
    "no": ("否", "no"),
    # clinician (detail, return, slips)
    "imaging": ("影像检查", "Imaging"),
    "impression": ("诊断意见", "Impression"),
    "study": ("检查", "Study"),
    "modality": ("设备类型", "Modality"),
    "started": ("检查时间", "Performed"),
    "instances": ("图像数", "Images"),
    "description": ("描述", "Description"),
    "body_site": ("部位", "Body site"),
    "return_hint": (
        "出院（或诊疗结束）并转回：填写后发出转回单，检验检查结果由本院系统随附。",
        (
            "Discharge (or finish) and return: this sends the return slip; lab and "
            "imaging results come from the hospital system."
        ),
    ),
    "diagnosis": ("诊断", "Diagnosis"),
    "course": ("诊疗经过", "Course of treatment"),
    "instructions": ("给社区医生的指导", "Instructions for the referring doctor"),
    "discharge_return": ("出院并转回", "Discharge and return"),
    "accepted_at": ("接收时间", "Accepted at"),
    "completed_at": ("转回时间", "Returned at"),
    "stay": ("就诊/住院时间", "Stay"),
    # auditor
    "member": ("成员单位", "Member"),
    "outcome_0": ("成功", "success"),
    "outcome_4": ("轻微失败", "minor failure"),
    "outcome_8": ("严重失败", "serious failure"),
    "outcome_12": ("重大失败", "major failure"),
    "time_hint": (
        "时间按北京时间解释（也可带时区）；起始含、截止不含",
        ("times are Beijing time unless an offset is given; since inclusive, until exclusive"),
    ),
    "audit_shown": (
        "条（最多显示 500 条，导出不受限）",
        "rows shown (at most 500; export has all)",
    ),
    # it
    "alerts": ("告警", "Alerts"),
    "no_alerts": ("当前无告警", "No active alerts"),
    "webhook": ("告警推送地址", "Alert webhook"),
    "not_configured": ("未配置", "not configured"),
    "rule_queue-depth": ("队列积压", "Queue depth"),
    "rule_queue-age": ("队列等待过久", "Queue age"),
    "rule_peer-silent": ("对方机构无响应", "Peer silent"),
    "rule_adapter-silent": ("接口长时间未成功", "Adapter silent"),
    "rule_audit-chain": ("审计链校验失败", "Audit chain broken"),
    "peers": ("对方机构与连通状态", "Peers and health"),
    "health": ("状态", "Health"),
    "healthy": ("正常", "healthy"),
    "silent": ("无响应", "silent"),
    "failing": ("出错", "failing"),
    "unknown": ("未知", "unknown"),
    "last_ack": ("最近送达确认", "Last receipt"),
    "last_in": ("最近收到数据", "Last packet in"),
    "last_probe": ("最近探测成功", "Last health answer"),
    "waiting": ("待发送", "Waiting"),
    "dead": ("死信", "Dead"),
    "retry": ("重新发送死信", "Retry dead letters"),
    "requeued": ("已重新排队", "Requeued"),
    "q_queued": ("排队中", "queued"),
    "q_sent": ("已发出待确认", "sent"),
    "q_acknowledged": ("已送达", "acknowledged"),
    "q_dead": ("死信", "dead"),
    "q_refused": ("被拒", "refused"),
    "queue": ("队列", "Queue"),
    "dead_letters": ("死信", "Dead letters"),
    "attempts": ("尝试次数", "Attempts"),
    "age": ("已等待", "Age"),
    "adapters": ("本院系统接口", "Adapters"),
    "adapter": ("接口", "Adapter"),
    "type": ("类型", "Type"),
    "last_ok": ("最近成功", "Last success"),
    "last_error": ("最近错误", "Last error"),
    "counters": ("计数", "Counters"),
    "no_adapters": ("本节点未配置接口", "No adapters configured on this node"),
    "mapping_gaps": ("编码映射缺口", "Mapping gaps"),
    "mapping_not_configured": (
        "未配置编码映射（没有接口设置 mappings 目录）",
        "Code mapping not configured (no adapter has a mappings folder)",
    ),
    "no_gaps": ("无映射缺口", "No mapping gaps"),
    "map": ("映射表", "Map"),
    "gap_kind": ("缺口类型", "Gap"),
    "gap_unmapped": ("未收录", "not in map"),
    "gap_no-target": ("无目标编码", "no target"),
    "gap_unknown-map": ("未知映射表", "unknown map"),
    # statistics
    "stats": ("转诊统计", "Referral statistics"),
    "stats_year": ("年度汇总（按成员单位）", "Year by member"),
    "stats_month": ("按月统计（按成员单位）", "By month and member"),
    "stats_hint": (
        "按转出机构与申请月份（北京时间）统计本节点参与的全部转诊；检验检查结果按发送机构统计。",
        (
            "Every referral this node took part in, by referring member and month of the "
            "request (Beijing time); results shared by sending member."
        ),
    ),
    "month": ("月份", "Month"),
    "year": ("年度", "Year"),
    "total": ("合计", "Total"),
    "up": ("上转", "Up"),
    "down": ("下转", "Down"),
    "accepted_n": ("已接收", "Accepted"),
    "rejected_n": ("已拒绝", "Rejected"),
    "cancelled_n": ("已撤销", "Cancelled"),
    "returned_n": ("已转回", "Returned"),
    "accept_rate": ("接收率", "Acceptance rate"),
    "median_accept": ("申请至接收（中位）", "Median time to accept"),
    "median_return": ("申请至转回（中位）", "Median time to return"),
    "results_shared": ("共享检验检查结果", "Results shared"),
    "chart_month": ("每月上转/下转", "up/down referrals per month"),
    "chart_member": ("各成员单位上转/下转", "up/down referrals per member"),
}


def pick_lang(query: str | None, cookie: str | None) -> str:
    for v in (query, cookie):
        if v in LANGS:
            return v
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
    "draft": ("草稿", "draft"),
    "requested": ("已申请", "requested"),
    "received": ("已收到", "received"),
    "accepted": ("已接收", "accepted"),
    "rejected": ("已拒绝", "rejected"),
    "in-progress": ("诊疗中", "in progress"),
    "cancelled": ("已撤销", "cancelled"),
    "completed": ("已完成", "completed"),
}


def status_name(lang: str, code: str | None) -> str:
    pair = STATUS.get(code or "")
    if pair is None:
        return code or ""
    return pair[1] if lang == "en" else pair[0]


LABELS.update(
    {  # lis (oru branch): control ids reused for different messages, IT page
        "reused_ids": (
            "重复使用的消息控制号（内容不同，已作为新消息接收）",
            "Reused message control ids (different content, taken in as new messages)",
        ),
    }
)


LABELS.update(
    {  # people branch: personal accounts, audit by name, message browser
        "user_name": ("用户名", "User name"),
        "password": ("密码", "Password"),
        "totp": ("动态口令", "One-time code"),
        "bad_login": (
            "用户名或密码错误，或账户已锁定/停用",
            "Wrong name or password, or the account is locked or disabled",
        ),
        "password_old": ("当前密码", "Current password"),
        "password_new": ("新密码", "New password"),
        "password_changed": ("密码已修改", "Password changed"),
        "save": ("保存", "Save"),
        "role_admin": ("账户管理员", "Account admin"),
        "accounts": ("账户", "Accounts"),
        "display_name": ("姓名", "Display name"),
        "roles": ("角色", "Roles"),
        "state": ("状态", "State"),
        "last_login": ("最近登录", "Last login"),
        "disabled": ("已停用", "disabled"),
        "locked": ("已锁定", "locked"),
        "active": ("有效", "active"),
        "enable": ("启用", "Enable"),
        "disable": ("停用", "Disable"),
        "owner": ("持有者", "Owner"),
        "revoked": ("已吊销", "revoked"),
        "revoke": ("吊销", "Revoke"),
        "add": ("添加", "Add"),
        "reset_password": ("重置密码", "Reset password"),
        "issue_token": ("签发令牌", "Issue token"),
        "api_tokens": ("接口令牌", "API tokens"),
        "token_once": (
            "令牌只显示这一次，请立即保存：",
            "The token is shown this once; store it now:",
        ),
        "done": ("已完成", "Done"),
        "shared_tokens_on": (
            "共用角色令牌仍可登录和调用接口（[web] shared_role_tokens = true）：无法追溯到个人，请为每人建立账户后关闭。",
            "Shared role tokens still log in and call the API ([web] shared_role_tokens = true): they name no person; give everyone an account, then turn them off.",
        ),
        "record_no": ("病案号", "Record no."),
        "direction": ("方向", "Direction"),
        "search_patient": (
            "患者（姓名/病案号/身份证号）",
            "Patient (name / record no. / ID number)",
        ),
        "matching": ("条符合", "matching"),
        "next_page": ("下一页", "Next page"),
        "address": ("来源地址", "Source address"),
        "shown_what": ("查看内容", "What was shown"),
        "national_id": ("身份证号", "National ID number"),
        "who_looked": ("谁查看过此患者", "Who looked at this patient"),
        "lookup_hint": (
            "身份证号只在本节点换算为密钥散列，不保存、不记录",
            "The ID number is turned into its keyed hash on this node; it is neither stored nor logged",
        ),
        "messages": ("消息浏览", "Messages"),
        "box": ("队列", "Box"),
        "packet_id": ("数据包号", "Packet id"),
        "path": ("路径", "Path"),
        "headers": ("报文头", "Headers"),
        "fhir_body": ("FHIR 内容", "FHIR body"),
        "raw_input": ("原始输入", "Raw input"),
        "resend": ("重发", "Resend"),
        "open_body": ("查看内容（将记入审计）", "Open the body (audited)"),
        "time_rule": (
            "时间可写 2026-12-01、2026-12-01T08:00、带时区 +08:00，或相对时间 -2h、-30m、-7d、today、yesterday；不带时区按本节点显示时区（默认北京时间）；起始含、截止不含",
            "Times: 2026-12-01, 2026-12-01T08:00, with an offset (+08:00), or relative (-2h, -30m, -7d, today, yesterday); without an offset they mean the node's display zone (default Beijing time); since inclusive, until exclusive",
        ),
        "on_page": ("条在本页", "on this page"),
        "shown": ("条显示于此", "shown here"),
        "see_all": ("查看全部", "See all"),
    }
)


LABELS.update(
    {  # consultations (远程会诊, MDT, imaging reading): bridge/web/consultations.py
        "consultations": ("远程会诊", "Consultations"),
        "consult_detail": ("会诊详情", "Consultation"),
        "consult_queue": ("会诊中心待办（本院为会诊中心）", "Centre queue (we are the centre)"),
        "consult_mine": ("本院发起的会诊", "Our consultations (we invite)"),
        "centre": ("会诊中心", "Consultation centre"),
        "inviter": ("申请机构", "Inviting member"),
        "inviting_doctor": ("申请医生", "Inviting doctor"),
        "consult_no": ("会诊申请单号", "Application no."),
        "consult_reason": ("申请原因", "Reason"),
        "question": ("会诊目的（需解答的问题）", "Question to the experts"),
        "missing": ("需补充的资料", "What is missing"),
        "cancel_asked": (
            "已申请取消，等待会诊中心确认",
            "Cancellation asked, waiting for the centre",
        ),
        "shared_records": ("病历资料与检查检验结果", "Shared records and results"),
        "records_text": ("补充资料内容", "The completed records"),
        "experts": ("会诊专家", "Experts"),
        "experts_hint": ("每行一位：姓名 科室", "One per line: name department"),
        "experts_n": ("本类会诊专家人数", "Experts for this kind"),
        "meeting": ("会诊时间", "Meeting time"),
        "start_time": ("开始时间", "Start"),
        "end_time": ("结束时间", "End"),
        "video_link": ("视频会议链接", "Video meeting link"),
        "report": ("会诊报告", "Consultation report"),
        "report_draft": ("报告草稿（质控前）", "Draft report (before quality control)"),
        "report_editor": ("书写会诊报告", "Write the report"),
        "consult_diagnosis": ("会诊诊断", "Diagnosis"),
        "icd10": ("诊断编码（ICD-10）", "Diagnosis code (ICD-10)"),
        "advice": ("诊疗建议", "Treatment advice"),
        "author": ("报告医师", "Reporting expert"),
        "recommend_referral": ("建议转诊", "Recommend referral"),
        "refer_to": ("建议转往", "Refer to"),
        "referral_note": (
            "转诊建议说明（已与家属沟通）",
            "Referral advice (agreed with the family)",
        ),
        "conclusion": ("影像诊断结论", "Conclusion of the study"),
        "findings": ("影像所见", "Findings"),
        "released_at": ("报告发布时间", "Released at"),
        "step_return": ("退回补充资料", "Return for completion"),
        "step_schedule": ("分配专家并排期", "Assign experts and schedule"),
        "step_start": ("开始会诊", "Start the consultation"),
        "step_report": ("保存报告草稿", "Save the draft report"),
        "step_release": ("质控通过并发布报告", "Quality check passed: release"),
        "step_cancelled": ("取消会诊", "Cancel the consultation"),
        "step_cancel": ("申请取消会诊", "Ask to cancel"),
        "step_resubmit": ("补充资料后重新提交", "Resubmit with the records"),
        "step_follow-up": ("安排随访", "Plan the follow-up"),
        "step_close": ("结束会诊", "Close"),
        "follow_up_text": ("随访安排", "Follow-up plan"),
        "follow_up_start": ("随访开始日期", "Follow-up from"),
        "make_referral": ("按会诊建议发起转诊", "Refer as the report recommends"),
        "referral_kind": ("转诊类型", "Referral kind"),
        "referral_consent": (
            "患者或家属已签署转诊知情同意",
            "The patient or family consented to the referral",
        ),
        "referral_made": ("已据此发起转诊", "Referral made from this report"),
        "open_referral": ("查看转诊", "Open the referral"),
        "print_application": ("远程会诊申请单", "Consultation application"),
        "print_consent": ("远程会诊知情同意书", "Consultation consent"),
        "print_report": ("远程会诊报告", "Consultation report"),
        "prints": ("打印", "Print"),
        "consent_text": (
            (
                "本人已了解远程会诊的目的、方式及可能的风险：会诊专家依据所提供的病历资料和检查结果提出诊疗意见，"
                "会诊意见仅供经治医师参考；本人同意将病历资料和检查检验结果提供给会诊中心及会诊专家，"
                "并同意以视频方式进行会诊。"
            ),
            (
                "I understand the purpose, manner and possible risks of the remote consultation: the "
                "experts give their opinion from the records and results provided, and the opinion "
                "advises my treating doctor. I agree that my records and results are shared with the "
                "consultation centre and its experts, and to a consultation by video."
            ),
        ),
        "consent_recorded": ("签署记录", "Consent as recorded"),
        "consent_at": ("签署时间", "Signed at"),
        "patient_signature": ("患者（或家属）签名", "Patient (or family) signature"),
        "relationship": ("与患者关系", "Relationship to the patient"),
        "doctor_signature": ("经治医师签名", "Treating doctor's signature"),
        "expert_signature": ("会诊专家签名", "Experts' signatures"),
        "qc_signature": ("质控", "Quality control"),
        "draft_mark": ("草稿，未经质控", "Draft, not yet quality-checked"),
        "stats_consult": (
            "远程会诊统计（按申请机构与月份）",
            "Consultations by inviting member and month",
        ),
        "consult_requested": ("申请", "Requested"),
        "consult_completed": ("完成（报告已发布）", "Completed (report released)"),
        "consult_referred": ("转为转诊", "Turned into referrals"),
        "referral_share": ("转诊比例", "Share referred"),
        "median_report": ("申请至报告（中位）", "Median time to report"),
        "export_csv": ("导出 CSV", "Export CSV"),
        "returned_for": ("退回原因", "Returned because"),
    }
)

CONSULT_EVENTS: dict[str, tuple[str, str]] = {  # the consultation history's events
    "request": ("提交会诊申请", "requested"),
    "received": ("会诊中心已收到", "received"),
    "return": ("退回补充资料", "returned for completion"),
    "resubmit": ("补充资料重新提交", "resubmitted"),
    "schedule": ("分配专家并排期", "scheduled"),
    "start": ("开始会诊", "consultation started"),
    "report": ("书写报告", "report written"),
    "release": ("质控通过，报告发布", "report released"),
    "report-received": ("报告已接收", "report received"),
    "follow-up": ("安排随访", "follow-up planned"),
    "close": ("结束", "closed"),
    "cancel": ("申请取消", "cancellation asked"),
    "cancelled": ("已取消", "cancelled"),
    "cancel-refused": ("取消未获同意（会诊已开始）", "cancellation refused"),
}


def consult_step_name(lang: str, code: str | None) -> str:
    from bridge.consult.codes import STEPS as CONSULT_STEPS

    s = CONSULT_STEPS.get(code or "")
    if s is None:
        return code or ""
    return s.en if lang == "en" else s.zh


def consult_kind_name(lang: str, code: str | None) -> str:
    from bridge.consult.codes import KINDS as CONSULT_KINDS

    k = CONSULT_KINDS.get(code or "")
    if k is None:
        return code or ""
    return k.en if lang == "en" else k.zh


def consult_event_name(lang: str, code: str | None) -> str:
    pair = CONSULT_EVENTS.get(code or "")
    if pair is None:
        return code or ""
    return pair[1] if lang == "en" else pair[0]
