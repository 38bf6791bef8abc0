"""How `billing status` shows a `StatusReport`: one screen of text, or JSON (`--json`)."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime, timedelta
from typing import Any

from webhooks.safetext import json_safe, safe_text
from workers.status import StatusReport, format_span


def format_status(report: StatusReport) -> str:
    """The report as about twenty lines of text, problems last; untrusted text escaped."""
    verdict = "OK" if report.healthy else f"NEEDS ATTENTION ({len(report.problems)})"
    lines = [f"billing status at {_when(report.checked_at)}: {verdict}", ""]
    if report.queues:
        lines.append(f"queues ({report.broker})    ready  running  retrying  dead  dead recently")
        for q in report.queues:
            running = "?" if q.in_progress is None else str(q.in_progress)
            lines.append(
                f"  {q.name:<18} {q.ready:>6} {running:>8} {q.delayed:>9} {q.dead:>5} "
                f"{q.dead_recent:>14}"
            )
    else:
        lines.append(f"queues: {report.broker} (no BROKER_URL or REDIS_URL to read them from)")
    outbox = report.outbox
    waited = "-" if outbox.oldest_pending_age is None else format_span(outbox.oldest_pending_age)
    lines += [
        "webhooks",
        f"  backlog                 {outbox.backlog} deliveries, oldest due waiting {waited}",
        f"  dead deliveries         {outbox.dead} ({outbox.dead_recent} recently)",
        f"  disabled subscriptions  {len(outbox.disabled)}",
    ]
    lines += [f"    {s.id} {s.topic} {s.url}: {s.reason or '-'}" for s in outbox.disabled]
    lines += [
        "jobs",
        f"  last aggregate          {_ago(report.last_aggregate_at, report.checked_at)}",
        f"  last invoice            {_ago(report.last_invoice_at, report.checked_at)}",
    ]
    run = report.invoice_run
    if run is not None:
        done = run.expected - run.missing
        lines.append(
            f"  invoices {run.period_start:%Y-%m}        {done} of {run.expected} generated"
        )
    if report.sync is None:
        lines.append("  provider sync           off (no PROVIDER_SYNC)")
    else:
        lines.append(
            f"  provider sync           {report.sync.unsynced} unsynced, "
            f"{report.sync.overdue} overdue"
        )
    if report.problems:
        lines += ["", "needs a human:"]
        lines += [f"  - {problem}" for problem in report.problems]
    return "\n".join(safe_text(line) for line in lines)  # tenants' and subscribers' text


def status_json(report: StatusReport) -> str:
    """The report as one JSON object (datetimes ISO 8601, durations in seconds)."""
    body = dataclasses.asdict(report)
    body["healthy"] = report.healthy
    return json_safe(json.dumps(body, default=_plain, indent=2, ensure_ascii=False))


def _plain(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _when(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def _ago(moment: datetime | None, now: datetime) -> str:
    if moment is None:
        return "never"
    return f"{_when(moment)} ({format_span(now - moment)} ago)"
