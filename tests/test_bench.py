"""
The benchmark harness's pure parts: reading wrk's output, building its
command line, checking answers, judging and printing.  No process is started.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

# bench/run.py runs as a script, with bench/ on the path: import the same way.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from oproxybench.common import BenchError, Load
from oproxybench.criteria import judge
from oproxybench.load import parse_wrk, wrk_command
from oproxybench.probes import Probe, check_answer, request_for, sse_events
from oproxybench.report import render, rst_table
from oproxybench.results import Cell, Results
from oproxybench.upstreams import canned_answers

WRK_TEXT = """\
Running 3s test @ http://127.0.0.1:4000/v1/chat/completions
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    11.80ms    2.10ms  40.00ms   90.00%
  Latency Distribution
     50%   11.56ms
     75%   12.40ms
     90%   13.90ms
     99%   15.84ms
  8139 requests in 3.00s, 5.10MB read
  Non-2xx or 3xx responses: 2
Requests/sec:   2713.00
Transfer/sec:      1.70MB
"""

BENCH_JSON = (
    'BENCH_JSON {"requests":8139,"duration_us":3000000,"bytes":5347323,'
    '"errors":{"connect":0,"read":1,"write":0,"status":2,"timeout":0},'
    '"latency_us":{"min":900,"mean":11800.5,"stdev":2100.0,"max":40000,'
    '"p50":11560,"p75":12400,"p90":13900,"p99":15840,"p999":30000}}'
)


def test_wrk_exact_numbers_come_from_the_json_line() -> None:
    result = parse_wrk(WRK_TEXT + BENCH_JSON + "\n")
    assert result["requests"] == 8139
    assert result["rps"] == pytest.approx(2713.0)
    assert result["p50_ms"] == pytest.approx(11.56)
    assert result["p999_ms"] == pytest.approx(30.0)
    assert result["errors"] == 3
    assert result["text_percentiles_ms"]["99"] == pytest.approx(15.84)


def test_wrk_text_is_the_fallback() -> None:
    result = parse_wrk(WRK_TEXT.replace("15.84ms", "1.02s"))
    assert result["requests"] == 8139
    assert result["rps"] == pytest.approx(2713.0)
    assert result["p99_ms"] == pytest.approx(1020.0)
    assert result["errors"] == 2


def test_unreadable_wrk_output_is_an_error() -> None:
    with pytest.raises(BenchError, match="could not parse"):
        parse_wrk("unable to connect to 127.0.0.1:4000 Connection refused\n")


def test_wrk_command_line() -> None:
    argv = wrk_command(4000, "/api/chat", Load(8, 4), seconds=3, script="post.lua")
    assert argv[1:8] == ["-t4", "-c4", "-d3s", "--timeout", "10s", "--latency", "-s"]
    assert argv[8].endswith("bench/wrk/post.lua")
    assert argv[-1] == "http://127.0.0.1:4000/api/chat"
    pinned = wrk_command(4000, "/", Load(1, 4, 20.0), seconds=1, script="budget.lua", cpus="1")
    assert pinned[:3] == ["taskset", "-c", "1"]


def test_the_canned_answers_pass_the_checks() -> None:
    answers = canned_answers(5)
    stream = Probe(200, {}, answers["stream"], 0.0)
    assert check_answer("stream", "direct", stream) == 6
    assert check_answer("chat", "direct", Probe(200, {}, answers["chat"], 0.0)) is None
    assert check_answer("embed", "direct", Probe(200, {}, answers["embed"], 0.0)) is None
    with pytest.raises(BenchError, match="HTTP 503"):
        check_answer("chat", "w1", Probe(503, {}, b"{}", 0.0))
    with pytest.raises(BenchError, match="unexpected answer"):
        check_answer("stream", "w1", Probe(200, {}, b"data: {}\n\n", 0.0))


def test_requests_per_target() -> None:
    assert request_for("embed", "direct").path == "/api/embed"
    assert request_for("stream", "direct").body["stream"] is True
    assert request_for("chat", "cache").body["temperature"] == 0
    assert "temperature" not in request_for("chat", "w1").body
    assert sse_events(b"data: a\n\ndata: [DONE]\n\n") == [b"a", b"[DONE]"]


def test_rst_table_aligns_columns() -> None:
    table = rst_table(["name", "n"], [["a", "1"], ["bb", "10"]], right={1})
    assert table.splitlines() == [
        "====  ==",
        "name   n",
        "====  ==",
        "a      1",
        "bb    10",
        "====  ==",
    ]


def _results() -> Results:
    settings = {
        "scenarios": ("chat",),
        "targets": ("direct", "w1"),
        "threads": 2,
        "connections": 32,
        "duration": 3.0,
        "low_threads": 1,
        "low_connections": 4,
        "low_rps": 200.0,
        "pace_ms": 5.0,
        "ttfb_requests": 0,
    }
    results = Results(meta={}, settings=settings)

    def run(rps: float, p50: float, p99: float) -> dict[str, float]:
        return {"rps": rps, "p50_ms": p50, "p99_ms": p99, "errors": 0}

    results.cells = [
        Cell("chat", "direct", 1, run(40000, 0.7, 1.0), run(200, 0.1, 0.3)),
        Cell("chat", "w1", 1, run(2000, 12.0, 16.0), run(200, 0.9, 6.0)),
    ]
    return results


def test_judging_against_the_targets() -> None:
    results = _results()
    judge(results)
    verdicts = {c["criterion"]: c["verdict"] for c in results.criteria}
    assert verdicts["chat non-streaming: added p50 at moderate load (1 worker)"] == "PASS"
    assert verdicts["chat non-streaming: added p99 at moderate load (1 worker)"] == "FAIL"
    assert verdicts["chat non-streaming: req/s (1 worker)"] == "PASS"
    assert verdicts["chat non-streaming: req/s, 2 workers / 1 worker"] == "n/a"
    assert verdicts["memory: VmRSS per worker"] == "n/a"


def test_the_report_shows_the_rows_and_the_verdicts() -> None:
    results = _results()
    judge(results)
    text = render(results)
    row = next(line for line in text.splitlines() if line.startswith("chat non-streaming  oproxy"))
    # x direct, +p50 and +p99 at moderate load, errors, and the verdicts of the row.
    assert row.split()[-7:] == ["0.05", "0.900", "6.000", "+0.800", "+5.700", "0", "FAIL"]
    assert json.dumps(results.to_json())  # the JSON form is plain data
