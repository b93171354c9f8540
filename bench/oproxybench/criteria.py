"""
The performance targets, and the verdict on each (PASS, FAIL, or n/a when it
was not measured).  Added latency and scaling come from the alternating
rounds when they ran, else from the table's rows.
"""

from __future__ import annotations

from .common import SCENARIO_TITLES
from .results import Results, value_of

TARGET_ADDED_P50_MS = 1.0
TARGET_ADDED_P99_MS = 5.0
TARGET_RPS_1W = 1500.0
TARGET_SCALING_2W = 1.6
TARGET_TTFB_ADDED_MS = 1.0
TARGET_CHUNKS_PER_WORKER = 20000.0
TARGET_RSS_MB = 80.0
TARGET_RSS_FLAT_PCT = 10.0


def judge(results: Results) -> None:
    """Add a verdict on every target to ``results.criteria`` (n/a when not measured)."""
    criteria = results.criteria

    def add(
        name: str,
        measured: float | None,
        target: str,
        ok: bool | None,
        unit: str = "",
        rows: tuple[tuple[str, str], ...] = (),
    ) -> None:
        criteria.append(
            {
                "criterion": name,
                "measured": measured,
                "unit": unit,
                "target": target,
                "verdict": "n/a" if ok is None or measured is None else ("PASS" if ok else "FAIL"),
                "rows": [list(r) for r in rows],
            }
        )

    latency = results.latency if results.latency and "error" not in results.latency else {}
    alternating = f" (medians of {latency.get('rounds')} alternating runs)" if latency else ""

    def added_in_rounds(key: str, measure: str) -> float | None:
        found = latency.get(key, {}).get(measure)
        return float(found["added_ms"]) if found else None

    for scenario in ("chat", "embed"):
        direct, w1 = results.cell(scenario, "direct"), results.cell(scenario, "w1")
        for pct, limit in (("p50", TARGET_ADDED_P50_MS), ("p99", TARGET_ADDED_P99_MS)):
            d, p = value_of(direct, "low", f"{pct}_ms"), value_of(w1, "low", f"{pct}_ms")
            added = p - d if d is not None and p is not None else None
            if scenario in latency:
                added = added_in_rounds(scenario, pct)
            add(
                f"{SCENARIO_TITLES[scenario]}: added {pct} at moderate load (1 worker)"
                + (alternating if scenario in latency else ""),
                added,
                f"<= {limit:g} ms",
                added is not None and added <= limit,
                "ms",
                ((scenario, "w1"),),
            )
    rps1 = value_of(results.cell("chat", "w1"), "high", "rps")
    add(
        "chat non-streaming: req/s (1 worker)",
        rps1,
        f">= {TARGET_RPS_1W:,.0f} req/s",
        rps1 is not None and rps1 >= TARGET_RPS_1W,
        "req/s",
        (("chat", "w1"),),
    )
    scaling = results.scaling
    if scaling and "error" not in scaling:
        scale = scaling["ratio"]
        scale_name = (
            "chat non-streaming: req/s, 2 workers / 1 worker "
            f"(medians of {scaling['rounds']} alternating runs)"
        )
    else:
        rps2 = value_of(results.cell("chat", "w2"), "high", "rps")
        scale = rps2 / rps1 if rps1 and rps2 else None
        scale_name = "chat non-streaming: req/s, 2 workers / 1 worker"
    add(
        scale_name,
        scale,
        f">= {TARGET_SCALING_2W:g}x",
        scale is not None and scale >= TARGET_SCALING_2W,
        "x",
        (("chat", "w2"),),
    )
    for part, how in (
        ("ttfb_paced", "paced upstream"),
        ("ttfb", "nginx burst"),
    ):
        d = value_of(results.cell("stream", "direct"), part, "ttfb_median_ms")
        p = value_of(results.cell("stream", "w1"), part, "ttfb_median_ms")
        added = p - d if d is not None and p is not None else None
        in_rounds = part == "ttfb_paced" and "ttfb_paced" in latency
        if in_rounds:
            added = added_in_rounds("ttfb_paced", "ttfb")
        add(
            f"chat streaming: added TTFB, {how} (1 worker)" + (alternating if in_rounds else ""),
            added,
            f"<= {TARGET_TTFB_ADDED_MS:g} ms",
            added is not None and added <= TARGET_TTFB_ADDED_MS,
            "ms",
            (("stream", "w1"),),
        )
    for target, workers in (("w1", 1), ("w2", 2)):
        cell = results.cell("stream", target)
        rps = value_of(cell, "high", "rps")
        per = (
            rps * cell.chunks_per_answer / workers
            if rps and cell and cell.chunks_per_answer
            else None
        )
        add(
            f"chat streaming: SSE chunks/s per worker ({workers} worker{'s' * (workers > 1)})",
            per,
            f">= {TARGET_CHUNKS_PER_WORKER:,.0f}/s",
            per is not None and per >= TARGET_CHUNKS_PER_WORKER,
            "chunks/s",
            (("stream", target),),
        )
    memory = results.memory
    if memory and "error" not in memory:
        last = memory[str(memory["total"])]
        add(
            f"memory: VmRSS per worker after {memory['total']:,} requests",
            last["rss_mib_max_process"] * 1.048576,
            f"<= {TARGET_RSS_MB:g} MB",
            last["rss_mib_max_process"] * 1.048576 <= TARGET_RSS_MB,
            "MB",
        )
        change = memory["change_pct"]
        add(
            f"memory: VmRSS change, {memory['checkpoint']:,} to {memory['total']:,} requests",
            change,
            f"within +/-{TARGET_RSS_FLAT_PCT:g}%",
            change is not None and abs(change) <= TARGET_RSS_FLAT_PCT,
            "%",
        )
    else:
        add("memory: VmRSS per worker", None, f"<= {TARGET_RSS_MB:g} MB", None, "MB")
        add("memory: VmRSS change", None, f"within +/-{TARGET_RSS_FLAT_PCT:g}%", None, "%")
