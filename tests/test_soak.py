"""
The soak's pure parts (``bench/oproxybench/soak``): its timeline, how it
puts each failed request down to a fault, and how it accounts for every
key's tokens and the processes' growth.
"""

from __future__ import annotations

import sys
from pathlib import Path

import openai
import pytest

# bench/soak.py runs as a script, with bench/ on the path: import the same way.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from oproxybench.soak.accounting import (
    KILLED,
    STOPPED,
    UNEXPLAINED,
    Expected,
    account_key,
    cause_of,
    expected_answer,
    flatness,
    prompt_estimate,
)
from oproxybench.soak.cli import parse_args, settings_from
from oproxybench.soak.load import Outcome, failure_of
from oproxybench.soak.plan import SHORT, SoakSettings, timeline

COST = Expected(usage=33, reserved=275, prompt_reserved=19, completion=17)


def ok(key: str = "k") -> Outcome:
    return Outcome(key, False, 0.0, 1.0, prompt_tokens=16, completion_tokens=17, content="hi")


def failed(cause: str, key: str = "k") -> Outcome:
    return Outcome(key, True, 0.0, 1.0, failure="connection lost", cause=cause)


def test_the_full_timeline() -> None:
    events = timeline(SoakSettings())
    kinds = [e.kind for e in events]
    assert kinds.count("reload") == 29  # every minute but the first
    kills = [e.at for e in events if e.kind == "kill"]
    assert kills == [330, 630, 930, 1230, 1530]
    stop = next(e.at for e in events if e.kind == "backend-stop")
    start = next(e.at for e in events if e.kind == "backend-start")
    assert (stop, start) == (855, 915)  # the middle period had a kill: one earlier
    assert [e.at for e in events] == sorted(e.at for e in events)
    assert [e.at for e in events if e.kind == "quiet-sample"] == [45]
    assert all(e.at < 1800 for e in events)


def test_the_short_timeline_keeps_every_fault() -> None:
    events = timeline(SHORT)
    assert {e.kind for e in events} == {
        "quiet-sample",
        "reload",
        "kill",
        "backend-stop",
        "backend-start",
        "sample",
    }
    assert [e.at for e in events if e.kind == "kill"] == [70, 130]
    periods = {SHORT.period_of(e.at) for e in events if e.kind in ("kill", "backend-stop")}
    assert len(periods) == 3  # each fault on a key of its own


def test_periods_and_their_keys() -> None:
    settings = SoakSettings(minutes=3, reload_every=20)
    assert settings.periods == 9
    assert [settings.period_of(at) for at in (0, 19.9, 20, 179, 185)] == [0, 0, 1, 8, 8]


def test_short_and_overrides() -> None:
    assert settings_from(parse_args(["--short"])) == SHORT
    settings = settings_from(parse_args(["--short", "--minutes", "5", "--clients", "3"]))
    assert (settings.minutes, settings.clients, settings.reload_every) == (5, 3, 20)
    assert settings_from(parse_args([])) == SoakSettings()


def test_failures_are_put_down_to_the_fault_in_flight() -> None:
    outcome = Outcome("k", True, 10.0, 12.0, failure="stream cut")
    assert cause_of(outcome, [(11.0, 11.0)], []) == KILLED
    assert cause_of(outcome, [], [(11.5, 13.0)]) == STOPPED
    assert cause_of(outcome, [(13.0, 13.0)], [(1.0, 9.0)]) == UNEXPLAINED


def test_what_the_client_saw() -> None:
    lost = openai.APIConnectionError.__new__(openai.APIConnectionError)
    assert failure_of(lost, 0) == "connection lost"
    assert failure_of(lost, 3) == "stream cut"
    timeout = openai.APITimeoutError.__new__(openai.APITimeoutError)
    assert failure_of(timeout, 0) == "timeout"
    assert failure_of(ValueError("x"), 0) == "ValueError"


def test_prompt_estimate_counts_every_string() -> None:
    assert prompt_estimate([{"role": "user", "content": "x" * 12}]) == 4


def test_a_key_whose_requests_completed_is_charged_exactly() -> None:
    account = account_key("k", "0-60 s", [ok(), ok()], 66, COST)
    assert (account.verdict, account.delta) == ("exact", 0)
    account = account_key("k", "0-60 s", [ok(), ok()], 67, COST)
    assert account.verdict == "WRONG"


def test_killed_requests_may_keep_their_reservation() -> None:
    outcomes = [ok(), failed(KILLED), failed(KILLED)]
    account = account_key("k", "", outcomes, 33 + 275, COST)
    assert account.verdict == "explained"
    assert account.kill_reservations == 1
    assert "1 of 2 killed requests" in account.note
    assert account_key("k", "", outcomes, 33 + 3 * 275, COST).verdict == "WRONG"


def test_cut_streams_are_charged_their_prompt_and_what_was_relayed() -> None:
    outcomes = [ok(), failed(STOPPED)]
    assert account_key("k", "", outcomes, 33 + 19 + 5, COST).verdict == "explained"
    assert account_key("k", "", outcomes, 33 + 19 + 18, COST).verdict == "WRONG"


def test_a_lost_settlement_is_named() -> None:
    account = account_key("drain", "", [ok(), ok(), ok()], 2 * 275 + 33, COST)
    assert account.verdict == "WRONG"
    assert "2 of 3 completed requests were charged their reservation" in account.note


def test_the_common_answer_is_the_expected_one() -> None:
    odd = Outcome("k", False, 0, 1, prompt_tokens=1, completion_tokens=1, content="odd")
    assert expected_answer([ok(), odd, ok()]) == {
        "content": "hi",
        "prompt_tokens": 16,
        "completion_tokens": 17,
    }


@pytest.mark.parametrize(("end_rss", "verdict"), [(1100, "PASS"), (1101, "FAIL")])
def test_flatness(end_rss: int, verdict: str) -> None:
    start = {"master": {"pid": 1, "rss_kib": 1000, "fds_besides_pool": 10}}
    end = {"master": {"pid": 1, "rss_kib": end_rss, "fds_besides_pool": 13}}
    other = {"pid": 2, "rss_kib": 5000, "fds_besides_pool": 99}
    rows = flatness({**start, "worker": other}, {**end, "worker": other}, ["master"])
    by = {(row.role, row.what): row.verdict for row in rows}
    assert by["master", "RSS KiB"] == verdict
    assert by["master", "descriptors (not to backends)"] == "FAIL"  # 3 more than at the start
    assert by["worker", "RSS KiB"] == "(not judged)"
