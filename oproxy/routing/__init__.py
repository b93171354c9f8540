"""
Choosing the backends that serve a model: aliases and patterns (the
``models:`` rules of :class:`~oproxy.config.RoutingConfig`), what each
backend serves (:mod:`~oproxy.routing.catalog`), which backends are healthy
(:mod:`~oproxy.routing.breaker`), and the order to try them in
(:mod:`~oproxy.routing.router`).
"""
