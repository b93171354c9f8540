"""
The admin console under ``/ui/``: pages, their JSON under ``/ui/api/``,
sessions, templates and packaged static files.

Its routes are rows of the route table (:mod:`oproxy.console.routes`),
served through the same pipeline as the API; they identify the caller by
the session cookie (:mod:`oproxy.console.access`) rather than by a bearer
key.  What it keeps between requests (sessions, the traffic of the last
hour, the configuration editor) is a :class:`~oproxy.console.parts.Console`
in the services record.
"""
