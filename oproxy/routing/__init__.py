"""
Choosing the backends that serve a model: aliases and patterns
(:mod:`~oproxy.routing.settings`), what each backend serves
(:mod:`~oproxy.routing.catalog`), which backends are healthy
(:mod:`~oproxy.routing.breaker`), and the order to try them in
(:mod:`~oproxy.routing.router`).
"""
