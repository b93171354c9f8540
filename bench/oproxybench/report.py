"""
The results as text: reStructuredText tables and lists, so they can be pasted
into bench/README.rst.
"""

from __future__ import annotations

from .common import SCENARIO_TITLES, TARGET_TITLES
from .results import Results, value_of


def rst_table(headers: list[str], rows: list[list[str]], right: set[int] | None = None) -> str:
    """A reStructuredText simple table (so it can be pasted into the README)."""
    right = right or set()
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    rule = "  ".join("=" * w for w in widths)

    def line(cells: list[str]) -> str:
        return "  ".join(
            (c.rjust(w) if i in right else c.ljust(w))
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([rule, line(headers), rule, *(line(r) for r in rows), rule])


def fmt(value: float | None, digits: int = 2, signed: bool = False) -> str:
    """A number for a table cell, ``-`` when there is none."""
    if value is None:
        return "-"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def render(results: Results) -> str:
    """Every table and line of the results, as printed on stdout."""
    sections = (_throughput, _alternating, _streaming, _time_to_first_byte, _memory, _targets)
    return "\n".join(line for section in sections for line in section(results))


def _throughput(results: Results) -> list[str]:
    """The main table, a row per scenario and target, and the CPU use around it."""
    s = results.settings
    verdicts: dict[tuple[str, str], list[str]] = {}
    for c in results.criteria:
        for scenario, target in c["rows"]:
            verdicts.setdefault((scenario, target), []).append(c["verdict"])
    headers = [
        "scenario",
        "target",
        "procs",
        "cpu",
        "req/s",
        "p50 ms",
        "p99 ms",
        "x direct",
        "mod p50",
        "mod p99",
        "+p50 ms",
        "+p99 ms",
        "errors",
        "check",
    ]
    rows = []
    for scenario in s["scenarios"]:
        direct = results.cell(scenario, "direct")
        for target in s["targets"]:
            cell = results.cell(scenario, target)
            if cell is None:
                continue
            if cell.error:
                rows.append(
                    [
                        SCENARIO_TITLES[scenario],
                        TARGET_TITLES[target],
                        "-",
                        "-",
                        "error",
                        *["-"] * 8,
                        "ERROR",
                    ]
                )
                continue
            if cell.high is None:
                rows.append(
                    [
                        SCENARIO_TITLES[scenario],
                        TARGET_TITLES[target],
                        str(cell.processes or "-"),
                        *["-"] * 10,
                        cell.note or "-",
                    ]
                )
                continue
            rps = cell.high["rps"]
            d_rps = value_of(direct, "high", "rps")
            ratio = rps / d_rps if d_rps and target != "direct" else None
            added = {}
            for pct in ("p50", "p99"):
                dv, pv = value_of(direct, "low", f"{pct}_ms"), value_of(cell, "low", f"{pct}_ms")
                added[pct] = (
                    pv - dv if target != "direct" and dv is not None and pv is not None else None
                )
            v = verdicts.get((scenario, target), [])
            check = "FAIL" if "FAIL" in v else ("PASS" if "PASS" in v else "-")
            if cell.note:
                check = cell.note if check == "-" else f"{check}; {cell.note}"
            errors = int(cell.high.get("errors", 0)) + int((cell.low or {}).get("errors", 0))
            rows.append(
                [
                    SCENARIO_TITLES[scenario],
                    TARGET_TITLES[target],
                    str(cell.processes),
                    fmt(cell.high.get("cpu", {}).get("server_cores")),
                    f"{rps:,.0f}",
                    fmt(cell.high["p50_ms"]),
                    fmt(cell.high["p99_ms"]),
                    fmt(ratio) if ratio is not None else "1.00" if target == "direct" else "-",
                    fmt(value_of(cell, "low", "p50_ms"), 3),
                    fmt(value_of(cell, "low", "p99_ms"), 3),
                    fmt(added["p50"], 3, True),
                    fmt(added["p99"], 3, True),
                    str(errors),
                    check,
                ]
            )
    out = [
        f"Throughput and latency. req/s, p50, p99: wrk -t{s['threads']} -c{s['connections']} "
        f"-d{s['duration']:g}s.  mod p50/p99: moderate load, wrk -t{s['low_threads']} "
        f"-c{s['low_connections']} with a pause per connection offering ~{s['low_rps']:g} req/s.  "
        f"+p50/+p99: proxy minus direct at moderate load.  Latencies in ms.",
        "",
        rst_table(headers, rows, right={2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}),
        "",
    ]
    foreign = [
        (run["cpu"]["foreign_cores"], cell)
        for cell in results.cells
        for run in (cell.high, cell.low)
        if run and "cpu" in run
    ]
    if foreign:
        worst, worst_cell = max(foreign, key=lambda x: x[0])
        mean = sum(f for f, _ in foreign) / len(foreign)
        out.append(
            f"procs: processes serving (the daemon and its children).  cpu: cores they used at "
            f"high load.  Other work on this machine during the measurements: "
            f"{mean:.2f} cores on average, at worst {worst:.2f} "
            f"({SCENARIO_TITLES[worst_cell.scenario]} / {TARGET_TITLES[worst_cell.target]})."
        )
        out.append("")
    return out


def _alternating(results: Results) -> list[str]:
    """Every round of the targets measured in alternation."""
    out: list[str] = []
    scaling = results.scaling
    if scaling and "error" not in scaling:
        runs = ", ".join(
            f"{a:,.0f} / {b:,.0f}"
            for a, b in zip(scaling["w1_rps"], scaling["w2_rps"], strict=True)
        )
        out.append(
            f"Scaling: chat non-streaming req/s of 1 worker / 2 workers in {scaling['rounds']} "
            f"alternating runs: {runs}; medians {scaling['w1_median']:,.0f} / "
            f"{scaling['w2_median']:,.0f}, ratio {scaling['ratio']:.2f}x."
        )
        out.append("")
    latency = results.latency
    if latency and "error" not in latency:
        for key, title in (
            ("chat", "chat non-streaming, moderate load"),
            ("embed", "embeddings, moderate load"),
            ("ttfb_paced", "chat streaming, TTFB behind the paced upstream"),
        ):
            for measure, found in latency.get(key, {}).items():
                pairs = ", ".join(
                    f"{d:.3f} / {w:.3f}" for d, w in zip(found["direct"], found["w1"], strict=True)
                )
                out.append(
                    f"Alternating: {title}, {measure} of direct / 1 worker in "
                    f"{latency['rounds']} rounds: {pairs} ms; added (medians) "
                    f"{found['added_ms']:+.3f} ms."
                )
        out.append("")
    return out


def _streaming(results: Results) -> list[str]:
    """Chunks per second through each target."""
    lines = []
    for target in results.settings["targets"]:
        cell = results.cell("stream", target)
        rps = value_of(cell, "high", "rps")
        if cell is None or rps is None or not cell.chunks_per_answer:
            continue
        workers = 2 if target == "w2" else 1
        total = rps * cell.chunks_per_answer
        unit = "NDJSON lines" if target == "direct" else "SSE chunks"
        per = "" if target == "direct" else f", {total / workers:,.0f} per worker"
        lines.append(
            f"* {TARGET_TITLES[target]}: {total:,.0f} {unit}/s "
            f"({rps:,.0f} answers/s x {cell.chunks_per_answer}{per})"
        )
    if not lines:
        return []
    return ["Streaming throughput", "", *lines, ""]


def _time_to_first_byte(results: Results) -> list[str]:
    """The sequential requests' first and last bytes, against the direct ones."""
    s = results.settings
    rows = []
    for scenario, part, how in (
        (
            "stream",
            "ttfb_paced",
            f"chat streaming, paced upstream ({s['pace_ms']:g} ms after line 1)",
        ),
        ("stream", "ttfb", "chat streaming, nginx (one burst)"),
        ("chat", "ttfb", "chat non-streaming, nginx"),
    ):
        direct_ms = value_of(results.cell(scenario, "direct"), part, "ttfb_median_ms")
        for target in s["targets"]:
            cell = results.cell(scenario, target)
            value = value_of(cell, part, "ttfb_median_ms")
            if value is None or cell is None:
                continue
            data = getattr(cell, part)
            rows.append(
                [
                    how,
                    TARGET_TITLES[target],
                    f"{value:.3f}",
                    fmt(value - direct_ms, 3, True)
                    if direct_ms is not None and target != "direct"
                    else "-",
                    f"{data['ttfb_p90_ms']:.3f}",
                    f"{data['total_median_ms']:.3f}",
                ]
            )
    if not rows:
        return []
    return [
        f"Time to first byte: median (and p90) of {s['ttfb_requests']} sequential requests "
        f"on one keep-alive connection, raw socket client; ms",
        "",
        rst_table(
            ["answer", "target", "first byte", "vs direct", "p90", "whole answer"],
            rows,
            right={2, 3, 4, 5},
        ),
        "",
    ]


def _memory(results: Results) -> list[str]:
    """VmRSS of the fresh proxy at its three readings."""
    memory = results.memory
    if not memory:
        return []
    out = ["Memory (fresh oproxy, workers: 1, non-streaming chat)", ""]
    if "error" in memory:
        out.append(f"* error: {memory['error']}")
    else:
        a, b = memory[str(memory["checkpoint"])], memory[str(memory["total"])]
        mb = 1.048576  # MiB to MB
        out.append(
            f"* VmRSS at start {memory['start']['rss_mib_total'] * mb:.1f} MB; "
            f"after {a['requests_done']:,} requests {a['rss_mib_total'] * mb:.1f} MB; "
            f"after {b['requests_done']:,} requests {b['rss_mib_total'] * mb:.1f} MB "
            f"({memory['change_pct']:+.1f}%); {b['processes']} process(es), the largest "
            f"{b['rss_mib_max_process'] * mb:.1f} MB; {a['run_rps']:,.0f} and "
            f"{b['run_rps']:,.0f} req/s, {a['run_errors'] + b['run_errors']} errors"
        )
    out.append("")
    return out


def _targets(results: Results) -> list[str]:
    """The verdicts, and the measurements that failed (last: they end the output)."""
    rows = []
    for c in results.criteria:
        unit = c["unit"]
        m = c["measured"]
        if m is None:
            measured = "-"
        elif unit in ("req/s", "chunks/s"):
            measured = f"{m:,.0f} {unit}"
        elif unit == "x":
            measured = f"{m:.2f}x"
        elif unit == "%":
            measured = f"{m:+.1f}%"
        else:
            measured = f"{m:.3f} {unit}" if unit == "ms" else f"{m:.1f} {unit}"
        rows.append([c["criterion"], measured, c["target"], c["verdict"]])
    out = ["Targets", "", rst_table(["criterion", "measured", "target", "result"], rows, right={1})]
    failed = [c for c in results.cells if c.error]
    if failed:
        out.extend(["", "Errors", ""])
        for bad in failed:
            first = bad.error.strip().splitlines()[0]
            out.append(f"* {SCENARIO_TITLES[bad.scenario]} / {TARGET_TITLES[bad.target]}: {first}")
    return out
