-- wrk script: like post.lua, but each thread stops after a budget of
-- responses, so a run drives an exact number of requests.
--
-- $BENCH_BUDGET   responses per thread
-- $BENCH_MARKERS  a directory; each thread creates "done-<id>" there when it
--                 has spent its budget
--
-- wrk's main thread sleeps for the whole -d duration whatever its threads
-- do, so the harness (bench/oproxybench/load.py) waits for every marker and
-- then sends wrk SIGINT, which ends the sleep and prints the summary at once.

dofile(os.getenv("BENCH_LUA_DIR") .. "/post.lua")

local budget = tonumber(os.getenv("BENCH_BUDGET"))
local markers = os.getenv("BENCH_MARKERS")
local next_id = 0
local count = 0

function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
end

function response(status, headers, body)
  count = count + 1
  if count == budget then
    local f = io.open(markers .. "/done-" .. tostring(id), "w")
    if f then f:close() end
    wrk.thread:stop()
  end
end
