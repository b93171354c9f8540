-- wrk script: POST one fixed JSON body, and print the results as JSON.
--
-- The body is read from the file named by $BENCH_BODY (the harness,
-- bench/oproxybench/load.py, writes it), so the same script serves every
-- scenario.  done() prints one line
--     BENCH_JSON {...}
-- with exact microsecond percentiles, which load.py parses (it also parses
-- wrk's own --latency text as a cross-check).

local path = os.getenv("BENCH_BODY")
if path then
  local f = assert(io.open(path, "rb"))
  wrk.method = "POST"
  wrk.body = f:read("*a")
  f:close()
  wrk.headers["Content-Type"] = "application/json"
end

-- Moderate load: with $BENCH_DELAY_MS set, each connection pauses before
-- each request for a random time with that mean (exponentially distributed,
-- capped at 10x), so the offered load stays well below what the server can
-- do (wrk has no fixed-rate mode) and the connections do not fall into
-- lock-step, which would queue their requests behind each other.
local pause = tonumber(os.getenv("BENCH_DELAY_MS") or "")
if pause and pause > 0 then
  math.randomseed(os.time() + math.floor(os.clock() * 1e6))
  function delay()
    local wait = -pause * math.log(1 - math.random())
    return math.floor(math.min(wait, 10 * pause) + 0.5)
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"min":%d,"mean":%.1f,"stdev":%.1f,"max":%d,' ..
    '"p50":%d,"p75":%d,"p90":%d,"p99":%d,"p999":%d}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency.mean, latency.stdev, latency.max,
    latency:percentile(50), latency:percentile(75), latency:percentile(90),
    latency:percentile(99), latency:percentile(99.9)))
end
