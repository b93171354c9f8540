"""
The circuit breaker on ``task.Clock``: its arithmetic, per (backend, model)
circuits beside each backend's own, the single trial, and circuits shared
by several processes through a state store (SQLite and a real Redis; each
"process" here is a breaker of its own over its own store connection).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from twisted.internet import defer, reactor, task

from oproxy.metrics import Metrics
from oproxy.resp import RedisClient
from oproxy.routing.breaker import GO, Breaker, CircuitSync, Outcome, Permit
from oproxy.routing.circuits import (
    FORGET_OPEN,
    Circuit,
    Policy,
    circuit_key,
    circuit_name,
    decode,
    encode,
    failed,
)
from oproxy.state.base import CircuitChange, IStateStore
from oproxy.state.redis import RedisStateStore
from oproxy.state.sqlite import SQLiteStore
from tests import redisserver
from tests.redisserver import RedisServer

redis_server = redisserver.redis_server

NOW = 1_700_000_000.0
M = "llama3.2:latest"
OTHER = "qwen3:latest"


def clock_at_now() -> task.Clock:
    clock = task.Clock()
    clock.advance(NOW)
    return clock


def local(clock: task.Clock, failures: int = 3, cooldown: float = 30.0) -> Breaker:
    return Breaker(clock, failures, cooldown)


async def permit(breaker: Breaker, backend: str = "a", model: str = M) -> Permit | None:
    answer = breaker.permit(backend, model)
    if isinstance(answer, defer.Deferred):
        answer = await answer
    return answer


def fail(breaker: Breaker, times: int, outcome: Outcome, model: str = M) -> None:
    for _ in range(times):
        breaker.report("a", model, GO, outcome)


# -- the arithmetic ------------------------------------------------------------------


def test_failures_open_a_circuit_only_when_they_come_in_a_row() -> None:
    policy = Policy(failures=3, cooldown=30)
    circuit = failed(None, NOW, policy)
    circuit = failed(circuit, NOW + 20, policy)
    assert not circuit.opened
    # A third failure long after the second is the first of a new series.
    circuit = failed(circuit, NOW + 51, policy)
    assert circuit.failures == 1 and not circuit.opened
    circuit = failed(failed(circuit, NOW + 52, policy), NOW + 53, policy)
    assert circuit.opened and circuit.opened_at == NOW + 53
    assert circuit.holds_back(NOW + 82.9, policy) and circuit.trial_due(NOW + 83, policy)
    assert circuit.retry_after(NOW + 60, policy) == 23


def test_a_circuit_is_forgotten_when_nothing_more_happens() -> None:
    policy = Policy(failures=3, cooldown=30)
    counting = failed(None, NOW, policy)
    assert counting.live(NOW + 29.9, policy) is counting
    assert counting.live(NOW + 30, policy) is None
    opened = Circuit(3, NOW, NOW)
    assert opened.live(NOW + 30 + FORGET_OPEN - 1, policy) is opened
    assert opened.live(NOW + 30 + FORGET_OPEN, policy) is None


circuits = st.builds(
    Circuit,
    st.integers(0, 10**6),
    st.floats(0, 3e9),
    st.none() | st.floats(0, 3e9),
    st.none() | st.floats(0, 3e9),
)


@given(circuits)
def test_a_circuit_comes_back_from_the_store_as_it_went(circuit: Circuit) -> None:
    assert decode(encode(circuit)) == circuit


@given(st.text(), st.text())
def test_circuit_names_are_unambiguous(backend: str, model: str) -> None:
    assert circuit_key(circuit_name(backend, model)) == (backend, model)


def test_what_is_not_a_circuit_reads_as_none() -> None:
    assert decode("garbage") is None and decode('{"a": 1}') is None
    assert decode("[1, 2]") is None
    assert circuit_key("garbage") is None and circuit_key('["a", 1]') is None


# -- one process -----------------------------------------------------------------------


def test_a_failing_model_is_held_back_and_the_backend_still_serves_the_others() -> None:
    clock = clock_at_now()
    breaker = local(clock)
    fail(breaker, 2, Outcome.MODEL_FAILED)
    assert not breaker.is_open("a", M)
    fail(breaker, 1, Outcome.MODEL_FAILED)
    assert breaker.is_open("a", M) and breaker.permit("a", M) is None
    assert not breaker.is_open("a", OTHER) and breaker.permit("a", OTHER) is GO
    assert not breaker.is_open("a")  # the backend itself is fine
    assert not breaker.is_open("b", M)
    assert breaker.retry_after("a", M) == 30 and breaker.retry_after("a", OTHER) == 0


def test_a_backend_that_cannot_be_reached_is_held_back_for_every_model() -> None:
    clock = clock_at_now()
    breaker = local(clock)
    fail(breaker, 3, Outcome.BACKEND_DOWN)
    assert breaker.is_open("a") and breaker.is_open("a", M) and breaker.is_open("a", OTHER)
    assert breaker.permit("a", OTHER) is None
    assert breaker.retry_after("a", OTHER) == 30
    # One answer from the server, busy or not, shows it is up again.
    clock.advance(30)
    trial = breaker.permit("a", OTHER)
    assert trial == Permit((("a", ""),))
    breaker.report("a", OTHER, trial, Outcome.BACKEND_UP)
    assert not breaker.is_open("a", OTHER)


def test_model_errors_and_unreachable_backends_are_counted_apart() -> None:
    breaker = local(clock_at_now())
    fail(breaker, 2, Outcome.BACKEND_DOWN)
    fail(breaker, 2, Outcome.MODEL_FAILED)  # the server answered: it is up
    fail(breaker, 1, Outcome.BACKEND_DOWN)
    assert not breaker.is_open("a", OTHER)
    fail(breaker, 1, Outcome.MODEL_FAILED, model=OTHER)
    assert not breaker.is_open("a", M) and not breaker.is_open("a", OTHER)


@pytest.mark.parametrize("outcome", [Outcome.BACKEND_UP, Outcome.UNKNOWN])
def test_busy_answers_and_client_errors_are_no_failures(outcome: Outcome) -> None:
    breaker = local(clock_at_now(), failures=1)
    fail(breaker, 10, outcome)
    assert not breaker.is_open("a", M) and breaker.permit("a", M) is GO


def test_an_answer_closes_the_model_and_the_backend() -> None:
    breaker = local(clock_at_now())
    fail(breaker, 2, Outcome.MODEL_FAILED)
    fail(breaker, 2, Outcome.BACKEND_DOWN)
    breaker.report("a", M, GO, Outcome.ANSWERED)
    fail(breaker, 2, Outcome.MODEL_FAILED)
    fail(breaker, 2, Outcome.BACKEND_DOWN)
    assert not breaker.is_open("a", M)  # both counts started again


def test_after_the_cooldown_one_trial_goes_and_decides() -> None:
    clock = clock_at_now()
    breaker = local(clock, failures=2, cooldown=10)
    fail(breaker, 2, Outcome.MODEL_FAILED)
    clock.advance(10)
    assert not breaker.is_open("a", M)
    trial = breaker.permit("a", M)
    assert trial == Permit((("a", M),))
    assert breaker.permit("a", M) is None and breaker.is_open("a", M)  # the others wait
    assert breaker.permit("a", OTHER) is GO
    assert trial is not None
    breaker.report("a", M, trial, Outcome.MODEL_FAILED)  # failed: another cooldown
    assert breaker.is_open("a", M) and breaker.retry_after("a", M) == 10
    clock.advance(10)
    trial = breaker.permit("a", M)
    assert trial is not None and trial.trials
    breaker.report("a", M, trial, Outcome.ANSWERED)
    assert breaker.permit("a", M) is GO and breaker.permit("a", M) is GO


@pytest.mark.parametrize("outcome", [Outcome.UNKNOWN, Outcome.BACKEND_UP, Outcome.BACKEND_DOWN])
def test_a_trial_that_says_nothing_of_the_model_hands_the_trial_on(outcome: Outcome) -> None:
    clock = clock_at_now()
    breaker = local(clock, failures=2, cooldown=10)
    fail(breaker, 2, Outcome.MODEL_FAILED)
    clock.advance(10)
    trial = breaker.permit("a", M)
    assert trial is not None and trial.trials
    breaker.report("a", M, trial, outcome)  # the client left, the server was busy...
    again = breaker.permit("a", M)
    assert again is not None and again.trials  # ...so the next request is the trial


def test_a_trial_never_reported_holds_its_circuit_for_one_cooldown_only() -> None:
    clock = clock_at_now()
    breaker = local(clock, failures=1, cooldown=10)
    fail(breaker, 1, Outcome.MODEL_FAILED)
    clock.advance(10)
    assert breaker.permit("a", M) is not None  # its process dies with it
    clock.advance(9.9)
    assert breaker.permit("a", M) is None
    clock.advance(0.1)
    later = breaker.permit("a", M)
    assert later is not None and later.trials


def test_probes_open_and_close_the_backend() -> None:
    clock = clock_at_now()
    breaker = local(clock)
    breaker.probed("a", reachable=False)
    assert breaker.is_open("a") and breaker.is_open("a", M)
    clock.advance(15)
    breaker.probed("a", reachable=False)  # still dead: the cooldown starts again
    clock.advance(20)
    assert breaker.is_open("a")
    breaker.probed("a", reachable=True)
    assert not breaker.is_open("a")


def test_new_thresholds_apply_to_the_circuits_there_are() -> None:
    clock = clock_at_now()
    breaker = local(clock)
    fail(breaker, 2, Outcome.MODEL_FAILED)
    breaker.configure(failures=2, cooldown=5)
    fail(breaker, 1, Outcome.MODEL_FAILED)
    assert breaker.is_open("a", M)
    clock.advance(5)
    assert not breaker.is_open("a", M)


def scrape(metrics: Metrics) -> str:
    return metrics.scrape().decode()


def test_open_circuits_are_shown_for_backends_and_listed_models() -> None:
    clock = clock_at_now()
    metrics = Metrics(CollectorRegistry())
    listed = {("a", M)}
    breaker = Breaker(
        clock, 1, 30, metrics=metrics, listed=lambda backend, model: (backend, model) in listed
    )
    fail(breaker, 1, Outcome.MODEL_FAILED)
    fail(breaker, 1, Outcome.MODEL_FAILED, model="made-up-by-a-client")
    breaker.report("b", M, GO, Outcome.BACKEND_DOWN)
    text = scrape(metrics)
    assert 'oproxy_model_circuit_open{backend="a",model="llama3.2:latest"} 1.0' in text
    assert "made-up-by-a-client" not in text
    assert 'oproxy_backend_circuit_open{backend="b"} 1.0' in text
    clock.advance(30)
    trial = breaker.permit("a", M)
    assert trial is not None
    breaker.report("a", M, trial, Outcome.ANSWERED)
    breaker.probed("b", reachable=True)
    text = scrape(metrics)
    assert 'oproxy_model_circuit_open{backend="a",model="llama3.2:latest"} 0.0' in text
    assert 'oproxy_backend_circuit_open{backend="b"} 0.0' in text


# -- several processes, one store ---------------------------------------------------


class Counting:
    """A store that counts the calls made to it, then passes them on."""

    def __init__(self, store: IStateStore) -> None:
        self.store = store
        self.calls: list[str] = []

    def update_circuit(self, name: str, change: CircuitChange, now: float) -> Any:
        self.calls.append("update_circuit")
        return self.store.update_circuit(name, change, now)

    def circuits(self, now: float) -> Any:
        self.calls.append("circuits")
        return self.store.circuits(now)


@pytest.fixture(params=["sqlite", "redis"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Any]]:
    """Open another connection to one shared store (a new one per test)."""
    opened: list[IStateStore] = []
    namespace = f"test:{uuid.uuid4().hex}:"

    def open_one() -> IStateStore:
        store: IStateStore
        if request.param == "sqlite":
            store = SQLiteStore(tmp_path / "state.db")
        else:
            server: RedisServer = request.getfixturevalue("redis_server")
            store = RedisStateStore(RedisClient(reactor, server.url), namespace=namespace)
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        pytest_twisted.blockon(store.close())


def workers(
    open_store: Callable[[], IStateStore], clock: task.Clock, count: int = 2, **policy: Any
) -> list[Breaker]:
    return [Breaker(clock, store=open_store(), **policy) for _ in range(count)]


async def settled(*breakers: Breaker) -> None:
    for breaker in breakers:
        await breaker.flushed()


@pytest_twisted.ensureDeferred
async def test_failures_seen_by_different_processes_add_up(
    open_store: Callable[[], IStateStore],
) -> None:
    clock = clock_at_now()
    one, two = workers(open_store, clock)
    fail(one, 2, Outcome.MODEL_FAILED)
    await settled(one)
    await two.sync()
    fail(two, 1, Outcome.MODEL_FAILED)
    await settled(two)
    assert two.is_open("a", M)  # the store's answer counted all three
    assert not one.is_open("a", M)  # not read yet...
    await one.sync()
    assert one.is_open("a", M)  # ...now it is
    assert not one.is_open("a", OTHER) and not one.is_open("a")


@pytest_twisted.ensureDeferred
async def test_a_cooldown_sends_one_trial_from_all_processes(
    open_store: Callable[[], IStateStore],
) -> None:
    clock = clock_at_now()
    breakers = workers(open_store, clock, count=3, failures=1, cooldown=10)
    fail(breakers[0], 1, Outcome.MODEL_FAILED)
    await settled(*breakers)
    for breaker in breakers:
        await breaker.sync()
        assert breaker.is_open("a", M)
    clock.advance(10)
    # Every process sees the trial due; one gets it.
    permits = [await permit(breaker) for breaker in breakers]
    assert [p is not None for p in permits] == [True, False, False]
    for breaker in breakers[1:]:
        assert breaker.is_open("a", M)  # they learnt who holds it
    first = permits[0]
    assert first is not None and first.trials
    breakers[0].report("a", M, first, Outcome.ANSWERED)
    await settled(*breakers)
    for breaker in breakers:
        await breaker.sync()
        assert await permit(breaker) is GO


@pytest_twisted.ensureDeferred
async def test_a_trial_claimed_together_goes_once(open_store: Callable[[], IStateStore]) -> None:
    clock = clock_at_now()
    breakers = workers(open_store, clock, count=4, failures=1, cooldown=10)
    fail(breakers[0], 1, Outcome.BACKEND_DOWN)
    await settled(*breakers)
    for breaker in breakers:
        await breaker.sync()
    clock.advance(10)
    answers = [breaker.permit("a", M) for breaker in breakers]  # all in flight at once
    permits = [await answer if isinstance(answer, defer.Deferred) else answer for answer in answers]
    assert sum(1 for p in permits if p is not None) == 1


@pytest_twisted.ensureDeferred
async def test_a_failed_trial_elsewhere_reopens_for_everyone(
    open_store: Callable[[], IStateStore],
) -> None:
    clock = clock_at_now()
    one, two = workers(open_store, clock, failures=1, cooldown=10)
    fail(one, 1, Outcome.MODEL_FAILED)
    await settled(one)
    await two.sync()
    clock.advance(10)
    trial = await permit(two)
    assert trial is not None
    two.report("a", M, trial, Outcome.MODEL_FAILED)
    await settled(two)
    await one.sync()
    assert one.is_open("a", M) and one.retry_after("a", M) == 10


@pytest_twisted.ensureDeferred
async def test_healthy_requests_cost_the_store_nothing(
    open_store: Callable[[], IStateStore],
) -> None:
    clock = clock_at_now()
    counted = Counting(open_store())
    breaker = Breaker(clock, store=counted)  # type: ignore[arg-type]
    for _ in range(100):
        allowed = breaker.permit("a", M)
        assert allowed is GO
        breaker.report("a", M, allowed, Outcome.ANSWERED)
        breaker.report("a", M, allowed, Outcome.UNKNOWN)
        breaker.report("a", M, allowed, Outcome.BACKEND_UP)
    assert counted.calls == []
    # With a circuit open elsewhere, still nothing for this one.
    breaker.report("b", OTHER, GO, Outcome.MODEL_FAILED)
    await settled(breaker)
    for _ in range(100):
        allowed = breaker.permit("a", M)
        assert allowed is GO
        breaker.report("a", M, allowed, Outcome.ANSWERED)
    assert counted.calls == ["update_circuit"]


@pytest_twisted.ensureDeferred
async def test_the_shared_circuits_are_read_on_an_interval(
    open_store: Callable[[], IStateStore],
) -> None:
    clock = clock_at_now()
    one, two = workers(open_store, clock, failures=1, cooldown=60)
    sync = CircuitSync(two, clock, interval=1.0)
    sync.startService()
    try:
        fail(one, 1, Outcome.MODEL_FAILED)
        await settled(one)
        assert not two.is_open("a", M)
        clock.advance(1.0)
        await settled(two)
        for _ in range(20):  # a Redis read takes a few reactor turns
            if two.is_open("a", M):
                break
            await task.deferLater(reactor, 0.01, lambda: None)
        assert two.is_open("a", M)
    finally:
        sync.stopService()


@pytest_twisted.ensureDeferred
async def test_without_the_store_each_process_keeps_its_own_circuits(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    clock = clock_at_now()
    metrics = Metrics(CollectorRegistry())
    broken = SQLiteStore(tmp_path / "a-file" / "state.db")
    breaker = Breaker(clock, 2, 10, store=broken, metrics=metrics)
    fail(breaker, 2, Outcome.MODEL_FAILED)
    await breaker.sync()
    assert breaker.is_open("a", M)
    clock.advance(10)
    trial = await permit(breaker)
    assert trial is not None and trial.trials
    assert await permit(breaker) is None
    assert 'oproxy_state_store_errors_total{operation="update_circuit"} 3.0' in scrape(metrics)
    assert 'oproxy_state_store_errors_total{operation="circuits"} 1.0' in scrape(metrics)
