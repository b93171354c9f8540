"""
Error reporting to Sentry (the optional ``sentry`` extra).

Unhandled errors reach Twisted's logger as events carrying a ``log_failure``:
the handler's catch-all logs one with the request id, route, model and
backend as fields, and the reactor logs unhandled Deferred errors.  A log
observer turns each into a Sentry event with those fields as tags.

Nothing private leaves: no request data, no local variables (frames of a
request hold prompts and keys), no default PII, and only the allow-listed
fields as tags.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from typing import Any

from twisted.application import service
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from zope.interface import implementer

from oproxy import __version__
from oproxy.config import SentryConfig

#: The log event fields that become Sentry tags; nothing else is sent.
TAG_FIELDS = ("request_id", "route", "model", "backend")


def _scrub(event: Any, hint: dict[str, Any]) -> Any:
    """Drop whatever an integration may have attached about the request."""
    for key in ("request", "extra", "user", "breadcrumbs"):
        event.pop(key, None)
    return event


@implementer(ILogObserver)
class SentryObserver:
    """Send logged failures to Sentry, tagged with the request's fields."""

    def __init__(self, sdk: Any) -> None:
        self._sdk = sdk

    def __call__(self, event: Mapping[str, Any]) -> None:
        failure = event.get("log_failure")
        if failure is None or event.get("log_level") not in (LogLevel.error, LogLevel.critical):
            return
        with self._sdk.new_scope() as scope:
            for field in TAG_FIELDS:
                if event.get(field) is not None:
                    scope.set_tag(field, str(event[field]))
            scope.set_tag("logger", str(event.get("log_namespace", "-")))
            self._sdk.capture_exception((failure.type, failure.value, failure.getTracebackObject()))


#: Why a configured DSN cannot be served.
NO_SDK = "sentry.dsn is set but sentry-sdk is not installed: pip install 'oproxy[sentry]'"


def check_reporting(config: SentryConfig) -> None:
    """
    Refuse, before anything starts, a DSN that cannot be reported to.

    :raises RuntimeError: a DSN is configured but ``sentry-sdk`` is missing.
    """
    if config.dsn and importlib.util.find_spec("sentry_sdk") is None:
        raise RuntimeError(NO_SDK)


def start_reporting(config: SentryConfig) -> SentryObserver | None:
    """
    Initialise the SDK and observe the global log; ``None`` without a DSN.

    :raises RuntimeError: a DSN is configured but ``sentry-sdk`` is missing.
    """
    if not config.dsn:
        return None
    try:
        import sentry_sdk
    except ImportError:
        raise RuntimeError(NO_SDK) from None
    sentry_sdk.init(
        dsn=config.dsn,
        environment=config.environment,
        release=config.release or f"oproxy@{__version__}",
        include_local_variables=False,
        max_request_body_size="never",
        default_integrations=False,
        before_send=_scrub,
    )
    observer = SentryObserver(sentry_sdk)
    globalLogPublisher.addObserver(observer)
    return observer


def stop_reporting(observer: SentryObserver | None) -> None:
    """Stop observing and send what is queued."""
    if observer is None:
        return
    globalLogPublisher.removeObserver(observer)
    import sentry_sdk

    sentry_sdk.flush(timeout=5)


class ReportingService(service.Service):
    """
    Report to Sentry while the process runs.

    The process's tree starts it before anything else and stops it after
    everything else, so that failures while starting, draining and closing
    are reported too, and what is queued is sent before the process exits.
    """

    def __init__(self, config: SentryConfig) -> None:
        self._config = config
        self._observer: SentryObserver | None = None

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self._observer = start_reporting(self._config)

    def stopService(self) -> None:
        super().stopService()  # type: ignore[no-untyped-call]
        observer, self._observer = self._observer, None
        stop_reporting(observer)
