"""
The ``console:`` section: the admin console served under ``/ui/``.

Its own module, as the console is a room of its own; :class:`Config` has
one field for it.
"""

import attrs

from oproxy.config.values import Count, Seconds

#: Twelve hours: a working day, after which the key is asked for again.
DEFAULT_SESSION_TTL = 12 * 3600.0


@attrs.frozen
class ConsoleConfig:
    """
    :ivar enabled: whether ``/ui/`` is served at all (it always needs an
        admin key; off, its routes answer 404).
    :ivar session_ttl: seconds a sign-in lasts.  A session also ends at
        once when its key is revoked, rotated, expires or loses ``admin``.
    :ivar login_attempts: sign-in attempts per minute from one client
        address, counted in the state store, so across every worker.
    """

    enabled: bool = True
    session_ttl: Seconds = DEFAULT_SESSION_TTL
    login_attempts: Count = 10
