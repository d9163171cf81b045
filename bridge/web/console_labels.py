"""Labels of the operations console (issue 15): dashboard, pause/resume, the new alert rules.

Kept apart from ``i18n.py`` (merged into its ``LABELS`` at import) so parallel work on the
shared label file does not collide.
"""

from __future__ import annotations

from bridge.web.i18n import LABELS

LABELS.update(
    {
        "rule_peer-unreachable": ("对方机构不可达", "Peer unreachable"),
        "rule_quarantine": ("有数据被隔离", "Items quarantined"),
        "rule_dead-letters": ("有无法投递的数据包", "Dead letters"),
        "rule_disk": ("磁盘空间不足", "Disk nearly full"),
        "rule_key-expiry": ("密钥即将到期", "Keys due for renewal"),
        "rule_cert-expiry": ("证书即将到期", "TLS certificate expiring"),
        "rule_consult-overdue": ("会诊申请等待超时", "Consultations waiting too long"),
        "dashboard": ("实时概况", "Live dashboard"),
        "channel": ("通道", "Channel"),
        "received_1h": ("收到(1小时)", "Received (1 h)"),
        "sent_1h": ("发出(1小时)", "Sent (1 h)"),
        "failed_1h": ("失败(1小时)", "Failed (1 h)"),
        "received_24h": ("收到(24小时)", "Received (24 h)"),
        "sent_24h": ("发出(24小时)", "Sent (24 h)"),
        "failed_24h": ("失败(24小时)", "Failed (24 h)"),
        "queued_now": ("排队中", "Queued"),
        "quarantined_24h": ("隔离(24小时)", "Quarantined (24 h)"),
        "oldest_waiting": ("最早等待", "Oldest waiting"),
        "running": ("运行中", "Running"),
        "paused": ("已暂停", "Paused"),
        "pause": ("暂停", "Pause"),
        "resume": ("恢复", "Resume"),
        "pause_sending": ("暂停发送", "Pause sending"),
        "resume_sending": ("恢复发送", "Resume sending"),
        "chart_rate": ("最近24小时每小时收发量", "Packets per hour, last 24 h"),
        "chart_errors": ("最近24小时每小时错误数", "Errors per hour, last 24 h"),
        "series_in": ("收到", "received"),
        "series_out": ("发出", "sent"),
        "series_failed": ("失败", "failed"),
        "series_quarantined": ("隔离", "quarantined"),
        "auto_refresh": ("页面每15秒自动刷新", "This page refreshes every 15 s"),
        "paused_done": ("已暂停", "Paused"),
        "resumed_done": ("已恢复", "Resumed"),
        "email": ("邮件", "E-mail"),
        "peer_kind": ("对方机构", "Peer"),
        "adapter_in": ("从本院系统收到", "From the local system"),
        "adapter_out": ("交给本院系统", "To the local system"),
        "adapter_kind": ("本院接口", "Local adapter"),
    }
)
