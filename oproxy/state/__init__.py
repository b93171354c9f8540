"""
Shared state: API keys, rate-limit buckets, quota counters, parallel leases.

One interface (:class:`~oproxy.state.base.IStateStore`), two stores: SQLite
for one host (every worker process opens the same WAL database) and Redis
for several hosts.  Both make each admission one atomic step, so a limit
holds exactly however many processes share it.
"""
