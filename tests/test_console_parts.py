"""
The console's parts on their own: the per-minute tally, the access log
follower (driven by ``task.Clock``, reads run at once), sessions, the
editor's masking and line finding, and the totals read from metrics.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from twisted.internet import defer, task

from oproxy.config import load_config
from oproxy.console.editor import (
    check_text,
    digest,
    is_secret,
    mask,
    node_at,
    problems,
    read_only_reason,
    unmask,
)
from oproxy.console.follow import LogFollower, start_of_window
from oproxy.console.sessions import Sessions, SessionSecret, key_fingerprint
from oproxy.console.tally import Filters, TrafficTally, bucket_of, bucket_seconds, percentile
from oproxy.console.totals import Totals, quantile, summarise
from oproxy.errors import InvalidRequest, RequestTooLarge
from oproxy.metrics import Metrics

NOW = 1_800_000_000.0


def record(
    when: float,
    *,
    status: int = 200,
    latency: float = 0.5,
    model: str = "llama3.2",
    key: str | None = "app",
    backend: str = "local",
    path: str = "/v1/chat/completions",
    first_token: float | None = None,
    tokens: tuple[int, int] = (10, 20),
    request_id: str | None = None,
) -> dict[str, Any]:
    return {
        "time": when - latency,
        "request_id": request_id or f"req_{when:.3f}_{status}",
        "key": key,
        "method": "POST",
        "path": path,
        "model": model,
        "backend": backend,
        "status": status,
        "latency_seconds": latency,
        "first_token_seconds": first_token,
        "prompt_tokens": tokens[0],
        "completion_tokens": tokens[1],
    }


# -- the tally ------------------------------------------------------------------------------


def test_buckets_are_within_twenty_percent() -> None:
    for seconds in (0.0005, 0.001, 0.0123, 0.5, 1.0, 7.3, 59.0, 600.0):
        bucket = bucket_seconds(bucket_of(seconds))
        assert seconds <= bucket * 1.0000001 and bucket <= max(seconds, 0.001) * 1.2 + 1e-9


def test_percentiles_of_a_histogram() -> None:
    counts = {bucket_of(0.1): 50, bucket_of(1.0): 45, bucket_of(10.0): 5}
    assert percentile(counts, 0.5) == pytest.approx(bucket_seconds(bucket_of(0.1)))
    assert percentile(counts, 0.95) == pytest.approx(bucket_seconds(bucket_of(1.0)))
    assert percentile(counts, 0.99) == pytest.approx(bucket_seconds(bucket_of(10.0)))
    assert percentile({}, 0.5) is None


def test_the_tally_keeps_an_hour_per_minute_by_model_key_and_backend() -> None:
    tally = TrafficTally()
    tally.add(record(NOW - 3 * 60, model="qwen3", key="search", first_token=0.05))
    tally.add(record(NOW - 2 * 60, status=429, key="search"))
    tally.add(record(NOW - 30, status=502, latency=2.0, backend="gpu"))
    tally.add(record(NOW - 10, status=499))
    tally.add(record(NOW - 2 * 3600))  # too old to tally: listed only
    tally.add(record(NOW - 5, path="/ui/api/dashboard"))  # the console itself
    tally.add({"not": "a record"})
    series = tally.series(NOW)
    assert len(series) == 60 and series[-1]["minute"] == int(NOW // 60) * 60
    assert sum(m["requests"] for m in series) == 4
    hour = tally.hour(NOW)
    total = hour["total"]
    assert (total["requests"], total["client_errors"], total["errors"]) == (4, 1, 1)
    assert total["error_rate"] == 0.25
    assert total["prompt_tokens"] == 40 and total["completion_tokens"] == 80
    assert total["first_token_p50"] == pytest.approx(bucket_seconds(bucket_of(0.05)))
    by_key = {row["name"]: row for row in hour["by_key"]}
    assert by_key["search"]["requests"] == 2 and by_key["search"]["client_errors"] == 1
    assert [row["name"] for row in hour["by_backend"]] == ["local", "gpu"]
    assert hour["by_model"][0] == {**hour["by_model"][0], "name": "llama3.2", "requests": 3}
    # An hour later, all of it has left the window.
    later = tally.hour(NOW + 3600)
    assert later["total"]["requests"] == 0
    assert tally.last_used["search"] == pytest.approx(NOW - 2 * 60)
    assert len(tally.recent(limit=100)) == 5


def test_recent_records_filter_and_find() -> None:
    tally = TrafficTally(recent=3)
    for n in range(5):
        tally.add(record(NOW - 10 + n, status=200 if n % 2 else 404, request_id=f"r{n}"))
    assert [r["request_id"] for r in tally.recent()] == ["r4", "r3", "r2"]
    assert [r["request_id"] for r in tally.recent(Filters(status="4xx"))] == ["r4", "r2"]
    assert [r["request_id"] for r in tally.recent(Filters(status="200"))] == ["r3"]
    assert tally.recent(Filters(key="nobody")) == []
    assert tally.find("r4") is not None
    assert tally.find("r0") is None  # fell out of the recent records


def test_too_many_distinct_names_fold_into_other() -> None:
    tally = TrafficTally()
    for n in range(150):
        tally.add(record(NOW, model=f"m{n}"))
    names = {row["name"] for row in tally.hour(NOW)["by_model"]}
    assert "(other)" in names and len(names) == 101


# -- following the access log ----------------------------------------------------------------


def at_once(function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
    return defer.maybeDeferred(function, *args)


def write(path: Path, records: list[dict[str, Any]], mode: str = "ab") -> None:
    with open(path, mode) as f:
        f.write(b"".join(orjson.dumps(r) + b"\n" for r in records))


def follower(path: Path, clock: task.Clock, **kw: Any) -> LogFollower:
    return LogFollower(str(path), clock, in_thread=at_once, **kw)


def fresh(tail: LogFollower, clock: task.Clock) -> TrafficTally:
    answered: list[TrafficTally] = []
    defer.Deferred.fromCoroutine(tail.fresh()).addCallback(answered.append)
    for _ in range(1000):
        if answered:
            break
        clock.advance(0.001)
    return answered[0]


def test_the_first_read_starts_where_the_hour_does(tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    old = [record(NOW - 7200 + n * 0.1) for n in range(20_000)]
    recent = [record(NOW - 1800 + n) for n in range(300)]
    write(path, old + recent)
    with open(path, "rb") as f:
        start = start_of_window(f.fileno(), path.stat().st_size, NOW - 3660)
    assert start > path.stat().st_size * 0.9  # the old part is never read
    clock = task.Clock()
    clock.advance(NOW)
    tail = follower(path, clock)
    tally = fresh(tail, clock)
    assert tail.state == "following"
    assert tally.hour(NOW)["total"]["requests"] == 300
    assert tally.records < 300 + 100


def test_new_lines_rotation_and_truncation_are_followed(tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    write(path, [record(NOW - 60)])
    clock = task.Clock()
    clock.advance(NOW)
    tail = follower(path, clock, poll=1.0)
    assert fresh(tail, clock).hour(NOW)["total"]["requests"] == 1
    write(path, [record(NOW - 50)])
    # A line half-written is not read until it is whole.
    with open(path, "ab") as f:
        f.write(orjson.dumps(record(NOW - 40))[:20])
    assert fresh(tail, clock).hour(NOW)["total"]["requests"] == 2
    with open(path, "ab") as f:
        f.write(orjson.dumps(record(NOW - 40))[20:] + b"\n")
    assert fresh(tail, clock).hour(NOW)["total"]["requests"] == 3
    # Rotated: a writer still finishes a line in the renamed file, then
    # reopens; both are read.
    os.rename(path, str(path) + ".1")
    write(Path(str(path) + ".1"), [record(NOW - 30)])
    write(path, [record(NOW - 20), record(NOW - 10)])
    clock.advance(1.0)
    clock.advance(0.01)
    assert fresh(tail, clock).hour(NOW)["total"]["requests"] == 6
    # Truncated in place: read again from the start.
    write(path, [record(NOW - 5)], mode="wb")
    clock.advance(1.0)
    clock.advance(0.01)
    assert fresh(tail, clock).hour(NOW)["total"]["requests"] == 7


def test_a_rotated_file_still_in_the_hour_is_read_at_start(tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    rotated = Path(str(path) + ".1")
    write(rotated, [record(NOW - 600), record(NOW - 500)])
    os.utime(rotated, (NOW - 400, NOW - 400))
    write(path, [record(NOW - 100)])
    clock = task.Clock()
    clock.advance(NOW)
    assert fresh(follower(path, clock), clock).hour(NOW)["total"]["requests"] == 3


def test_a_big_log_is_read_in_chunks_and_the_first_answer_does_not_wait(tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    write(path, [record(NOW - 1000 + n * 0.01) for n in range(5000)])
    clock = task.Clock()
    clock.advance(NOW)

    def slowly(function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        # Each read takes a millisecond, as a thread's would.
        return task.deferLater(clock, 0.001, function, *args)

    tail = LogFollower(str(path), clock, in_thread=slowly, chunk=8192, first_wait=0.02)
    answered: list[TrafficTally] = []
    defer.Deferred.fromCoroutine(tail.fresh()).addCallback(answered.append)
    for _ in range(25):  # the first answer's patience: reading goes on
        clock.advance(0.001)
    assert answered and tail.state == "loading"
    assert 0 < (tail.progress or 0) < 1
    for _ in range(10_000):
        if tail.state == "following":
            break
        clock.advance(0.001)
    assert tail.state == "following" and tail.progress is None
    assert tail.tally.hour(NOW)["total"]["requests"] == 5000


def test_the_follower_stops_when_nobody_looks(tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    write(path, [record(NOW - 60)])
    clock = task.Clock()
    clock.advance(NOW)
    tail = follower(path, clock, poll=1.0, idle=10.0)
    fresh(tail, clock)
    for _ in range(12):
        clock.advance(1.0)
    assert tail.state == "stopped"
    assert tail.tally.records == 0
    assert fresh(tail, clock).records == 1  # and starts again when asked


def test_a_missing_log_is_waited_for(tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    clock = task.Clock()
    clock.advance(NOW)
    tail = follower(path, clock, poll=1.0)
    assert fresh(tail, clock).records == 0
    write(path, [record(NOW - 1)])
    clock.advance(1.0)
    clock.advance(0.01)
    assert fresh(tail, clock).records == 1


# -- sessions ----------------------------------------------------------------------------------


def test_sessions_are_signed_and_expire(tmp_path: Path) -> None:
    clock = task.Clock()
    clock.advance(NOW)
    secret = SessionSecret(str(tmp_path / "state" / "console-signing-key"))
    sessions = Sessions(secret, clock)
    value, session = sessions.issue("key:abc", "ops", "f" * 24, 60)
    assert sessions.read(value) == session
    clock.advance(59.9)
    assert sessions.read(value) == session
    clock.advance(0.1)
    assert sessions.read(value) is None
    assert stat.S_IMODE(os.stat(secret.path).st_mode) == 0o600
    # Another process reads the same secret; a fresh one would not do.
    again = Sessions(SessionSecret(secret.path), clock)
    value, session = again.issue("cfg:boss", "boss", "x", 60)
    assert sessions.read(value) == session
    other = Sessions(SessionSecret(str(tmp_path / "elsewhere")), clock)
    assert other.read(value) is None


def test_csrf_tokens_belong_to_their_session(tmp_path: Path) -> None:
    clock = task.Clock()
    sessions = Sessions(SessionSecret(str(tmp_path / "key")), clock)
    _, one = sessions.issue("cfg:a", "a", "x", 60)
    _, two = sessions.issue("cfg:a", "a", "x", 60)
    assert sessions.csrf_matches(one, sessions.csrf_token(one))
    assert not sessions.csrf_matches(one, sessions.csrf_token(two))
    assert not sessions.csrf_matches(one, None)
    assert not sessions.csrf_matches(one, "")


@given(st.text(max_size=200))
def test_no_string_is_a_session(text: str) -> None:
    sessions = Sessions(lambda: b"k" * 32, task.Clock())
    assert sessions.read(text) is None


def test_fingerprints_change_with_the_key() -> None:
    assert key_fingerprint(b"a" * 32) != key_fingerprint(b"b" * 32)
    assert len(key_fingerprint(b"a" * 32)) == 24


# -- the editor ---------------------------------------------------------------------------------


FILE = """\
# Comments stay.
backends:
  - {name: local, url: "http://127.0.0.1:11434"}
  - name: cloud
    type: openai
    url: https://api.example.com/v1
    api_key: sk-cloud-secret   # the provider's
auth:
  keys:
    - name: from-env
      key: "${OPROXY_KEY}"
    - name: literal
      key: 'sk-literal-secret'
      admin: true
state:
  backend: redis
  url: "redis://:redis-password@127.0.0.1:6379/0"
metrics:
  bearer_token: |
    multi-line-token
models:
  llama3.2:
    target: llama3.2:3b
"""


def test_secrets_are_masked_and_come_back() -> None:
    masked, secrets = mask(FILE)
    for secret in ("sk-cloud-secret", "sk-literal-secret", "redis-password", "multi-line-token"):
        assert secret not in masked
    assert "${OPROXY_KEY}" in masked  # a reference holds no secret
    assert "# Comments stay." in masked and "# the provider's" in masked
    assert masked.count("[masked:") == len(secrets) == 4
    assert unmask(masked, secrets) == FILE
    yaml.safe_load(masked)  # still YAML
    with pytest.raises(InvalidRequest):
        unmask(masked.replace("[masked:0]", "[masked:7]"), secrets)


def test_a_file_that_does_not_parse_is_masked_by_line() -> None:
    masked, secrets = mask("auth:\n  keys:\n    - key: sk-hidden\n  broken: [\n")
    assert "sk-hidden" not in masked and secrets == ["sk-hidden"]


@given(st.text(alphabet=st.characters(codec="ascii", categories=("L", "N")), min_size=1))
def test_any_secret_value_is_masked(secret: str) -> None:
    text = f"backends:\n  - name: b\n    api_key: x{secret}\n"
    masked, secrets = mask(text)
    assert f"x{secret}" not in masked
    assert unmask(masked, secrets) == text


def test_what_counts_as_a_secret() -> None:
    assert is_secret("api_key", "abc") and is_secret("bearer_token", "abc")
    assert is_secret("github_token", "abc") and is_secret("dsn", "https://k@sentry.io/1")
    assert is_secret("url", "redis://:pw@host") and not is_secret("url", "http://host:1")
    assert not is_secret("key", "${KEY}") and not is_secret("name", "sk-looks-like-one")


def test_problems_are_placed_on_their_lines() -> None:
    def load(text: str) -> Any:
        return load_config(text, {"OPROXY_KEY": "k"})

    root = yaml.compose(FILE, Loader=yaml.SafeLoader)
    assert node_at(root, "models.llama3.2.target").start_mark.line == 22
    assert node_at(root, "backends[1].api_key").start_mark.line == 6
    assert node_at(root, "auth.keys[1].admin").start_mark.line == 13
    assert node_at(root, "nowhere.at.all") is root
    (problem,) = problems(FILE.replace("target: llama3.2:3b", "target: 5"), load)
    assert problem.line == 23 and problem.key == "models.llama3.2.target"
    (problem,) = problems(FILE + "  extra: [\n", load)
    assert problem.line is not None and "YAML" in problem.message
    (problem,) = problems(FILE.replace("${OPROXY_KEY}", "${UNSET_VARIABLE}"), load)
    assert problem.line == 11 and "UNSET_VARIABLE" in problem.message


def test_text_checks() -> None:
    assert check_text("a: 1\n") == "a: 1\n"
    with pytest.raises(RequestTooLarge):
        check_text("#" * (1024 * 1024 + 1))
    with pytest.raises(InvalidRequest, match="control character"):
        check_text("a: 1\n\x00")
    with pytest.raises(InvalidRequest, match="not valid UTF-8"):
        check_text("a: \ud800")
    with pytest.raises(InvalidRequest):
        check_text(5)
    assert digest("a") != digest("b")


def test_read_only_reasons(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "oproxy.yaml"
    path.write_text("{}\n")
    assert read_only_reason(str(path)) is None
    assert "embedded defaults" in (read_only_reason(None) or "")
    monkeypatch.setattr(os, "access", lambda p, mode: p != str(path))
    assert "not writable" in (read_only_reason(str(path)) or "")
    monkeypatch.setattr(os, "access", lambda p, mode: p != str(tmp_path))
    assert "directory" in (read_only_reason(str(path)) or "")


# -- totals from the metrics -----------------------------------------------------------------------


def test_quantiles_interpolate_within_buckets() -> None:
    buckets = {0.1: 10.0, 1.0: 90.0, 10.0: 100.0, float("inf"): 100.0}
    assert quantile(buckets, 0.5) == pytest.approx(0.1 + 0.9 * 40 / 80)
    assert quantile(buckets, 0.95) == pytest.approx(1.0 + 9.0 * 5 / 10)
    assert quantile({float("inf"): 0.0}, 0.5) is None


def test_totals_from_metrics() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    for _ in range(3):
        metrics.requests.labels("/v1/chat/completions", "llama3.2", "local", "200").inc()
        metrics.duration.labels("/v1/chat/completions").observe(0.3)
    metrics.requests.labels("/v1/chat/completions", "-", "-", "404").inc()
    metrics.requests.labels("/v1/models", "-", "local", "502").inc()
    metrics.requests.labels("/ui/api/keys", "-", "-", "201").inc()  # not traffic
    metrics.first_token.labels("chat", "llama3.2").observe(0.04)
    metrics.count_tokens({"prompt_tokens": 5, "completion_tokens": 7}, model="llama3.2", key="app")
    metrics.backend_up.labels("local").set(1)
    figures = summarise(registry.collect())
    total = figures["total"]
    assert (total["requests"], total["client_errors"], total["errors"]) == (5, 1, 1)
    assert total["prompt_tokens"] == 5 and total["completion_tokens"] == 7
    assert 0.25 <= total["latency_p50"] <= 0.5
    model = next(row for row in figures["by_model"] if row["name"] == "llama3.2")
    assert model["requests"] == 3 and model["completion_tokens"] == 7
    assert model["first_token_p50"] is not None
    key = figures["by_key"][0]
    assert key["name"] == "app" and key["requests"] is None and key["prompt_tokens"] == 5
    assert figures["backends"]["local"]["up"] == 1


@given(
    st.lists(
        st.tuples(
            st.floats(min_value=0, max_value=7200, allow_nan=False),
            st.sampled_from((200, 404, 429, 502)),
            st.sampled_from(("a", "b", "c")),
            st.floats(min_value=0, max_value=30, allow_nan=False),
        ),
        max_size=80,
    ),
    st.floats(min_value=0, max_value=600, allow_nan=False),
)
def test_the_kept_hour_is_the_hour_of_the_lines(
    lines: list[tuple[float, int, str, float]], later: float
) -> None:
    """Summed as lines come (late ones too), the hour says what a recount says."""
    now = NOW + later
    tally = TrafficTally()
    kept = []
    for age, status, model, latency in lines:
        ended = NOW - age
        line = record(ended, status=status, model=model, latency=latency)
        tally.add(line)
        kept.append((ended, status, model))
    first = int(now // 60) - 59
    inside = [(e, s, m) for e, s, m in kept if first <= int(e // 60) <= int(now // 60)]
    hour = tally.hour(now)
    assert hour["total"]["requests"] == len(inside)
    assert hour["total"]["errors"] == sum(1 for _, s, _ in inside if s >= 500)
    counted = {row["name"]: row["requests"] for row in hour["by_model"]}
    expected: dict[str, int] = {}
    for _, _, model in inside:
        expected[model] = expected.get(model, 0) + 1
    assert counted == expected
    assert sum(m["requests"] for m in tally.series(now)) == len(inside)


def test_with_workers_the_totals_are_read_in_the_background(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    readings = iter(range(1000))
    monkeypatch.setattr("oproxy.console.totals._read_all", lambda metrics: {"n": next(readings)})
    clock = task.Clock()
    pending: list[defer.Deferred[Any]] = []

    def in_thread(function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        done: defer.Deferred[Any] = defer.Deferred()
        pending.append(done)
        done.addCallback(lambda _: function(*args))
        return done

    totals = Totals(Metrics(None), clock, in_thread)
    answers: list[Any] = []
    defer.Deferred.fromCoroutine(totals.read(wait=0.005)).addCallback(answers.append)
    assert answers == [] and len(pending) == 1  # the first answer waits a little
    clock.advance(0.005)
    assert answers == [None]  # and no longer: the figures come later
    pending.pop().callback(None)
    defer.Deferred.fromCoroutine(totals.read()).addCallback(answers.append)
    assert answers[-1] == {"n": 0}
    clock.advance(2.0)  # renewed while in use, not when asked
    assert len(pending) == 1
    pending.pop().callback(None)
    defer.Deferred.fromCoroutine(totals.read()).addCallback(answers.append)
    assert answers[-1] == {"n": 1}
    for _ in range(400):  # nobody asks for ten minutes: it stops
        clock.advance(2.0)
        for done in pending:
            done.callback(None)
        pending.clear()
    defer.Deferred.fromCoroutine(totals.read(wait=0.0)).addCallback(answers.append)
    clock.advance(0)
    assert answers[-1] is None
    totals.stop()


def test_a_small_log_is_read_whole_before_the_first_answer(tmp_path: Path) -> None:
    path = tmp_path / "access.jsonl"
    write(path, [record(NOW - 30), record(NOW - 20)])
    clock = task.Clock()
    clock.advance(NOW)

    def slowly(function: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return task.deferLater(clock, 0.004, function, *args)

    tail = LogFollower(str(path), clock, in_thread=slowly, first_wait=0.001)
    answered: list[TrafficTally] = []
    defer.Deferred.fromCoroutine(tail.fresh()).addCallback(answered.append)
    for _ in range(10):
        clock.advance(0.004)
    assert answered and answered[0].records == 2
