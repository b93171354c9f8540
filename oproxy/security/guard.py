"""
The door: who is calling, may they use this model, and is there room.

:class:`Guard` joins the pure parts (key format, policies, the limit
arithmetic in :mod:`oproxy.security.limits`) to the state store.  It is
built once per process; the config snapshot a request started with is
passed in, so a reload changes keys and limits for the next request only.
"""

from __future__ import annotations

import contextlib
import functools
import hmac
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.web.iweb import IRequest

from oproxy.config import AuthConfig, StateConfig
from oproxy.errors import InvalidRequest, PermissionDenied, StoreUnavailable, Unauthorized
from oproxy.metrics import Metrics
from oproxy.security.keys import hash_key, parse_token
from oproxy.security.limits import (
    LEASE_SECONDS,
    Caller,
    Plan,
    corrections,
    estimate_completion_tokens,
    estimate_prompt_tokens,
    generation_count,
    plan,
    rate_headers,
    refusal_error,
)
from oproxy.security.policy import KeyPolicy, Limits, PolicyError, policy_from_json
from oproxy.state.base import IStateStore, Lease, StateUnavailable

log = Logger()

NO_KEY = (
    "You didn't provide an API key. You need to provide your API key in an "
    "Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY)."
)
BAD_KEY = "Incorrect API key provided."
#: Compared against when a key id is unknown, so a miss costs what a hit does.
_NOWHERE = hash_key("")
#: How often stored-key presence is re-read and parallel leases renewed.
REFRESH_SECONDS = 5.0


ONE_CREDENTIAL = (
    "Only one credential header is allowed: send a single Authorization header "
    "(and at most one x-api-key header)."
)
TWO_KEYS = (
    "The Authorization and x-api-key headers name different keys: send the key in one of them."
)


def credential(request: IRequest, *, x_api_key: bool = False) -> bytes | None:
    """
    The request's ``Authorization`` header, refusing a request that sends it
    (or ``x-api-key``) more than once.

    With two, Twisted keeps the last while a front proxy may check the first;
    a request that could mean two callers is refused rather than guessed at.
    A single header whose value holds a comma is one header: it is simply not
    a key.

    ``x-api-key`` is read as the key only where ``x_api_key`` says so: on
    Anthropic's routes, whose SDKs and Claude Code send the key there.  It is
    then the key as an ``Authorization: Bearer`` header would carry it, and
    a request that sends both headers must name the same key in both.  On
    the other routes it is not read (the OpenAI API has no such header), but
    a front proxy may read it, so a second one is refused all the same.

    :raises InvalidRequest: a credential header appears more than once, or
        both name different keys.
    """
    headers = request.requestHeaders
    authorization: list[bytes] | None = headers.getRawHeaders(b"authorization")
    api_key: list[bytes] | None = headers.getRawHeaders(b"x-api-key")
    if (authorization is not None and len(authorization) > 1) or (
        api_key is not None and len(api_key) > 1
    ):
        raise InvalidRequest(ONE_CREDENTIAL, code="multiple_credentials")
    if not x_api_key or not api_key:
        return authorization[0] if authorization else None
    as_bearer: bytes = b"Bearer " + api_key[0].strip()
    if authorization and bearer_token(authorization[0]) != bearer_token(as_bearer):
        raise InvalidRequest(TWO_KEYS, code="multiple_credentials")
    return as_bearer


def bearer_token(authorization: bytes | None) -> str | None:
    """The token of an ``Authorization: Bearer`` header, if there is one."""
    if not authorization:
        return None
    scheme, _, token = authorization.decode("latin-1").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


@dataclass
class Ticket:
    """An admitted request's charges, to be settled when it ends."""

    caller: Caller
    plan: Plan
    headers: dict[str, str] = field(default_factory=dict)
    settled: bool = False


class Guard:
    """
    Authentication, permissions, rate limits and quotas for one process.

    :param store: where stored keys, buckets and counters live.
    :param state: how to behave when the store is down.
    """

    def __init__(
        self,
        store: IStateStore,
        clock: IReactorTime,
        metrics: Metrics,
        state: StateConfig,
    ) -> None:
        self.store = store
        self.clock = clock
        self.metrics = metrics
        self.fail_open = state.on_unavailable == "open"
        #: Whether the store holds a key that is not revoked; refreshed in the background.
        self.stored_keys = False
        #: Whether the store answered its last use.
        self.store_up = True
        self._leases: dict[tuple[str, str], Lease] = {}
        self._refresher: task.LoopingCall | None = None
        #: Store writes started and not yet answered (settlements, renewals):
        #: what :meth:`stop` waits for before the store may close.
        self._writing: set[defer.Deferred[Any]] = set()

    # -- who ------------------------------------------------------------------

    async def identify(self, auth: AuthConfig, authorization: bytes | None, address: str) -> Caller:
        """
        The caller, from its bearer token and address.

        While no key exists anywhere (and ``auth.require_keys`` is off),
        callers are anonymous unless they present a valid key, and any other
        token is ignored: clients such as the OpenAI SDK insist on sending
        one.  Once a key exists, a token must be right; callers without one
        are served only when ``auth.anonymous`` says so.

        :raises Unauthorized: missing, wrong, revoked or expired key.
        :raises PermissionDenied: the key may not be used from this address.
        """
        token = bearer_token(authorization)
        keys_exist = bool(auth.keys) or auth.require_keys or self.stored_keys
        if token is None:
            if keys_exist and not auth.anonymous:
                raise Unauthorized(NO_KEY)
            return anonymous(address, auth)
        caller = _listed(auth, token) or await self._stored(token, keys_exist)
        if caller is None:
            if keys_exist:
                raise Unauthorized(BAD_KEY)
            return anonymous(address, auth)
        return self._usable(caller, address)

    async def key_holder(self, auth: AuthConfig, token: str, address: str) -> Caller:
        """
        The holder of the key ``token``, checked as :meth:`identify` checks
        it, but never anonymous: for places that want a real key even while
        none exists (``/metrics`` from beyond its networks).

        :raises Unauthorized: ``token`` is no key, or a revoked or expired one.
        :raises PermissionDenied: the key may not be used from this address.
        :raises StoreUnavailable: a stored key cannot be checked.
        """
        caller = _listed(auth, token) or await self._stored(token, keys_exist=True)
        if caller is None:
            raise Unauthorized(BAD_KEY)
        return self._usable(caller, address)

    def _usable(self, caller: Caller, address: str) -> Caller:
        """``caller``, unless its key has expired or may not be used from ``address``."""
        if caller.policy.expired(self.clock.seconds()):
            raise Unauthorized("This API key has expired.")
        if not caller.policy.allows_address(address):
            raise PermissionDenied(
                f"This API key may not be used from your address ({address}).",
                code="ip_not_allowed",
            )
        return caller

    async def _stored(self, token: str, keys_exist: bool) -> Caller | None:
        """
        The stored key ``token`` names, looked up even before the background
        refresh has noticed that stored keys exist, so a new key works (and
        is limited) at once.
        """
        parsed = parse_token(token)
        if parsed is None:
            return None
        key_id, secret = parsed
        try:
            record = await self._use(self.store.get_key(key_id), "get_key")
        except StateUnavailable:
            if not keys_exist:
                return None  # nobody needs a key: serve as anonymous
            # Without the store a stored key cannot be checked, open or not.
            raise StoreUnavailable(
                "The key store is unavailable, so your API key cannot be checked. "
                "Please try again shortly.",
                headers={"retry-after": "1"},
            ) from None
        expected = record.secret_sha256 if record is not None else _NOWHERE
        if not hmac.compare_digest(expected, hash_key(secret)) or record is None:
            return None
        if record.revoked is not None:
            raise Unauthorized("This API key has been revoked.")
        try:
            policy = policy_from_json(record.policy)
        except PolicyError:
            log.error("Stored key {key_id} has an unreadable policy; refusing it", key_id=key_id)
            return None
        return Caller(subject=f"key:{key_id}", name=record.name, policy=policy)

    # -- may they, and is there room ---------------------------------------------

    async def admit(
        self,
        caller: Caller,
        model: str | None,
        route: str,
        body: Mapping[str, Any],
        request_id: str,
    ) -> Ticket | None:
        """
        Check the model, then charge every limit and quota at once.

        A request that runs several generations (prompts times ``n``) is
        charged for each of them against ``rpm``, and its token estimate
        covers them all, in the same atomic step: it is admitted whole or
        refused whole, before anything runs.

        Returns ``None`` when nothing limits the caller (nothing to settle).

        :raises PermissionDenied: the key may not use ``model``.
        :raises RateLimited: a rate or parallel limit is full (``Retry-After`` set).
        :raises QuotaExceeded: a token quota is used up.
        :raises StoreUnavailable: the store is down and the proxy fails closed.
        """
        if model is not None and not caller.policy.allows_model(model):
            raise PermissionDenied(
                f"This API key may not use the model '{model}'.",
                param="model",
                code="model_not_allowed",
            )
        if not caller.policy.limited:
            return None
        now = self.clock.seconds()
        spent = plan(
            caller,
            model,
            prompt_estimate=estimate_prompt_tokens(route, body),
            completion_estimate=estimate_completion_tokens(route, body),
            now=now,
            lease_id=request_id,
            generations=generation_count(route, body),
        )
        try:
            admission = await self._use(
                self.store.admit(spent.rates, spent.quotas, spent.leases, now), "admit"
            )
        except StateUnavailable:
            if self.fail_open:
                return None
            raise StoreUnavailable(
                "The rate-limit store is unavailable. Please try again shortly.",
                headers={"retry-after": "1"},
            ) from None
        if admission.refusal is not None:
            raise refusal_error(admission.refusal, caller, admission.rates)
        for lease in spent.leases:
            self._leases[lease.lease_id, lease.bucket] = lease
        return Ticket(caller, spent, rate_headers(admission.rates))

    def settle(self, ticket: Ticket, actual_tokens: int | None) -> None:
        """
        Correct the token estimate to what was used and free parallel slots.

        ``None`` keeps the estimate (nothing better is known).  Runs in the
        background: the answer has already gone, and a store that fails here
        only costs accuracy, which the failure metric shows.
        """
        if ticket.settled:
            return
        ticket.settled = True
        spent = ticket.plan
        for lease in spent.leases:
            self._leases.pop((lease.lease_id, lease.bucket), None)
        rates, quotas = corrections(
            spent, spent.estimate if actual_tokens is None else actual_tokens
        )
        if not (rates or quotas or spent.leases):
            return
        done = self._use(
            self.store.settle(rates, quotas, spent.leases, self.clock.seconds()), "settle"
        )
        done.addErrback(lambda f: f.trap(StateUnavailable))
        self._until_written(done)

    def _until_written(self, writing: defer.Deferred[Any]) -> None:
        """
        Remember a store write until it is answered, so that :meth:`stop`
        waits for it.  SQLite answers at once (nothing to remember); Redis
        answers later, and a store closed before would lose the write.
        """
        if writing.called:
            return
        self._writing.add(writing)

        def written(result: Any) -> Any:
            self._writing.discard(writing)
            return result

        writing.addBoth(written)

    # -- upkeep -------------------------------------------------------------------

    def start(self) -> None:
        """
        Refresh stored-key presence and renew leases every few seconds.

        The first refresh is the store's first use: a SQLite file is opened
        (and made, the first time) here, not when the guard is built.
        """
        self._refresher = task.LoopingCall(self.refresh)
        self._refresher.clock = self.clock
        self._refresher.start(REFRESH_SECONDS, now=True).addErrback(
            lambda f: log.failure("Guard upkeep stopped", f)
        )

    def stop(self) -> defer.Deferred[None]:
        """
        Stop the upkeep and wait for every store write already started: the
        settlements of requests that have ended, and a renewal under way.

        The store stays open (see :meth:`close`); whoever owns the process's
        resources calls this once no request is left to settle.
        """
        if self._refresher is not None and self._refresher.running:
            self._refresher.stop()
        return defer.Deferred.fromCoroutine(self._written())

    async def _written(self) -> None:
        while self._writing:
            # A write's answer may start another (a renewal after a refresh).
            await defer.DeferredList(list(self._writing))

    def close(self) -> defer.Deferred[None]:
        """Stop (waiting for the writes under way), then close the store."""

        async def stop_and_close() -> None:
            await self.stop()
            await self.store.close()

        return defer.Deferred.fromCoroutine(stop_and_close())

    def refresh(self) -> defer.Deferred[None]:
        """Re-read whether stored keys exist; push back the expiry of held leases."""
        now = self.clock.seconds()

        async def run() -> None:
            try:
                self.stored_keys = await self._use(self.store.has_active_keys(), "has_active_keys")
                if self._leases:
                    renewed = [
                        Lease(lease.bucket, lease.lease_id, lease.limit, now + LEASE_SECONDS)
                        for lease in self._leases.values()
                    ]
                    await self._use(self.store.renew(renewed, now), "renew")
            except StateUnavailable:
                pass

        refreshing = defer.Deferred.fromCoroutine(run())
        self._until_written(refreshing)
        return refreshing

    async def check(self) -> dict[str, Any]:
        """
        The store's health for ``/readyz`` and ``/v1/health``: whether it
        answers now, and whether the proxy can serve when it does not.
        """
        with contextlib.suppress(StateUnavailable):
            await self._use(self.store.ping(), "ping")
        return {
            "reachable": self.store_up,
            "on_unavailable": "open" if self.fail_open else "closed",
        }

    def _use(self, operation: defer.Deferred[Any], name: str) -> defer.Deferred[Any]:
        """Note in metrics whether the store answered."""

        def answered(result: Any) -> Any:
            self.store_up = True
            self.metrics.state_up.set(1)
            return result

        def failed(failure: Any) -> Any:
            if failure.check(StateUnavailable):
                self.store_up = False
                self.metrics.state_up.set(0)
                self.metrics.state_errors.labels(name).inc()
                log.warn(
                    "State store {operation} failed: {reason}",
                    operation=name,
                    reason=failure.getErrorMessage(),
                )
            return failure

        return operation.addCallbacks(answered, failed)


def anonymous(address: str, auth: AuthConfig) -> Caller:
    """A caller without a key, limited (if at all) per client address."""
    return _anonymous(address, auth.anonymous_limits)


@functools.lru_cache(maxsize=4096)
def _anonymous(address: str, limits: Limits) -> Caller:
    # Made once per address and limits, not on every request.
    return Caller(subject=f"ip:{address}", name=None, policy=KeyPolicy(limits=limits))


def _listed(auth: AuthConfig, token: str) -> Caller | None:
    """
    The config-file key matching ``token``: every key is compared, in
    constant time, so neither timing nor the loop says which one (or how
    much of one) matched.
    """
    digest = hash_key(token)
    found = None
    for key in auth.keys:
        if hmac.compare_digest(key.sha256, digest):
            found = key
    if found is None:
        return None
    return Caller(subject=f"cfg:{found.name}", name=found.name, policy=found.policy)
