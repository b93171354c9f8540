"""
When a certificate is renewed, and how long to wait after a failure.

Pure arithmetic over Unix seconds, so the service that follows it can be
driven by a :class:`twisted.internet.task.Clock` in tests.

A certificate is renewed once less than a third of its lifetime is left
(Caddy's rule, which leaves a month of a Let's Encrypt certificate's 90
days to retry in).  A failure is retried later and later, up to six hours
apart: a CA that is down, a DNS name not yet pointing here or a port 80
that is closed are fixed by people, and hammering the CA meanwhile only
reaches its rate limits (Let's Encrypt allows five failed validations per
name an hour).
"""

from __future__ import annotations

#: Seconds to wait after the first failure, the second, ...; the last
#: stays for every failure after.
RETRY_DELAYS: tuple[float, ...] = (60, 120, 300, 600, 1200, 1800, 3600, 7200, 21600)

#: The longest the service sleeps before looking at the files again, so a
#: certificate replaced or deleted by hand is noticed.
LONGEST_SLEEP = 3600.0


def renewal_time(not_before: float, not_after: float) -> float:
    """When a certificate valid from ``not_before`` to ``not_after`` is renewed."""
    return not_after - (not_after - not_before) / 3


def retry_delay(failures: int) -> float:
    """Seconds to wait after ``failures`` failures in a row (at least one)."""
    return RETRY_DELAYS[max(0, min(failures, len(RETRY_DELAYS)) - 1)]


def sleep_until(due: float, now: float) -> float:
    """How long to sleep before acting at ``due``, looking again at least hourly."""
    return max(0.0, min(due - now, LONGEST_SLEEP))
