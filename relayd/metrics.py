"""Every Prometheus metric relayd exports, declared together with help text
(chasquid's "exported variables" block). Labels are bounded: no per-user
label; ``upstream`` is an upstream id (``idsmtp``, ``system:<n>`` or
``domain:<domain>``), whose number the operator controls.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

MESSAGES = Counter(
    "relayd_messages", "Messages at the end of DATA, by result "
    "(delivered, deferred, bounced, rejected, error).", ["result"], registry=REGISTRY)
RECIPIENTS = Counter(
    "relayd_recipients", "RCPT commands by result (accepted, hourly_limit, total_limit, "
    "too_many, disabled, invalid).", ["result"], registry=REGISTRY)
AUTH_ATTEMPTS = Counter(
    "relayd_auth_attempts", "AUTH attempts by result (success, failure, disabled, locked_out).",
    ["result"], registry=REGISTRY)
LIMIT_REJECTIONS = Counter(
    "relayd_limit_rejections", "Recipients refused because a quota was reached.",
    ["limit"], registry=REGISTRY)
UPSTREAM_ATTEMPTS = Counter(
    "relayd_upstream_attempts", "Delivery attempts per upstream by result (ok, error, refused).",
    ["upstream", "result"], registry=REGISTRY)
UPSTREAM_ERRORS = Gauge(
    "relayd_upstream_errors", "Current consecutive error count (numerrors) per upstream.",
    ["upstream"], registry=REGISTRY)
DELIVERY_DURATION = Histogram(
    "relayd_delivery_duration_seconds", "Time from end of DATA to the final upstream answer.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY)
SESSIONS_ACTIVE = Gauge(
    "relayd_sessions_active", "SMTP sessions currently connected.", registry=REGISTRY)
CONFIG_RELOADS = Counter(
    "relayd_config_reloads", "SIGHUP reloads by result (ok, error).", ["result"],
    registry=REGISTRY)
FROM_REWRITES = Counter(
    "relayd_from_rewrites", "Messages whose sender was rewritten to an upstream's default.",
    registry=REGISTRY)

for _result in ("delivered", "deferred", "bounced", "rejected", "error"):
    MESSAGES.labels(_result)
for _result in ("success", "failure", "disabled", "locked_out"):
    AUTH_ATTEMPTS.labels(_result)
for _limit in ("hourly", "total"):
    LIMIT_REJECTIONS.labels(_limit)
for _result in ("ok", "error"):
    CONFIG_RELOADS.labels(_result)


def exposition() -> bytes:
    return generate_latest(REGISTRY)
