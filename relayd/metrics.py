"""Every Prometheus metric relayd exports, declared together with help text
(chasquid's "exported variables" block). Labels are bounded: no per-user
label; ``upstream`` is an upstream id (``idsmtp``, ``system:<n>`` or
``domain:<domain>``), whose number the operator controls.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

REGISTRY = CollectorRegistry(auto_describe=True)

MESSAGES = Counter(
    "relayd_messages", "Messages at the end of DATA, by result "
    "(delivered, deferred, unconfirmed, bounced, rejected, error).", ["result"], registry=REGISTRY)
RECIPIENTS = Counter(
    "relayd_recipients", "RCPT commands by result (accepted, hourly_limit, total_limit, "
    "too_many, disabled, invalid).", ["result"], registry=REGISTRY)
AUTH_ATTEMPTS = Counter(
    "relayd_auth_attempts", "AUTH attempts by result (success, failure, disabled, locked_out).",
    ["result"], registry=REGISTRY)
LIMIT_REJECTIONS = Counter(
    "relayd_limit_rejections", "Recipients refused because a quota was reached.",
    ["limit"], registry=REGISTRY)
PROXY_REFUSALS = Counter(
    "relayd_proxy_refusals", "Connections of a proxy_protocol listener closed before the "
    "session, by reason (untrusted_peer, no_proxy_header, malformed_header, timed_out, "
    "connection_closed, too_many_sessions).", ["reason"], registry=REGISTRY)
UPSTREAM_ATTEMPTS = Counter(
    "relayd_upstream_attempts", "Delivery attempts per upstream by result (ok, error, refused, "
    "skipped: the upstream lacks 8BITMIME or SMTPUTF8 for the message).",
    ["upstream", "result"], registry=REGISTRY)


class _UpstreamErrors:
    """relayd_upstream_errors, read at scrape time from the running relay's
    upstream records, so every upstream shows, changed or not."""

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[tuple[str, int]]] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "relayd_upstream_errors", "Current consecutive error count (numerrors) per upstream.",
            labels=["upstream"])
        for upstream, numerrors in (self.source() if self.source else ()):
            family.add_metric([upstream], numerrors)
        yield family

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter([GaugeMetricFamily("relayd_upstream_errors", "", labels=["upstream"])])


UPSTREAM_ERRORS = _UpstreamErrors()
REGISTRY.register(UPSTREAM_ERRORS)
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
LOCKOUTS = Counter(
    "relayd_lockouts", "Client IPs locked out after too many failed AUTHs in the window.",
    registry=REGISTRY)
LOCKOUTS_CLEARED = Counter(
    "relayd_lockouts_cleared", "Lockouts lifted by the operator (DELETE /admin/lockouts/{ip}).",
    registry=REGISTRY)

for _result in ("delivered", "deferred", "unconfirmed", "bounced", "rejected", "error"):
    MESSAGES.labels(_result)
for _result in ("success", "failure", "disabled", "locked_out"):
    AUTH_ATTEMPTS.labels(_result)
for _limit in ("hourly", "total"):
    LIMIT_REJECTIONS.labels(_limit)
for _result in ("ok", "error"):
    CONFIG_RELOADS.labels(_result)


def forget_upstreams(idsmtps: Iterable[str]) -> None:
    """Drop the attempt counters of deleted upstreams, so that labels stay
    bounded by the upstreams that exist (the errors gauge follows by itself)."""
    for idsmtp in idsmtps:
        for result in ("ok", "error", "refused", "skipped"):
            try:
                UPSTREAM_ATTEMPTS.remove(idsmtp, result)
            except KeyError:
                pass


def exposition() -> bytes:
    return generate_latest(REGISTRY)
