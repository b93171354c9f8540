"""
What the two fakes share: writing answers (:mod:`.http`), the clock-driven
pacing of a generation (:mod:`.pacing`), the counters and request log
(:mod:`.stats`), the server skeleton with its route table, failure queue
and ``/_fake/*`` routes (:mod:`.server`), the words and vectors both
answer with (:mod:`.answers`) and running a fake as a process
(:mod:`.serving`).

Nothing here knows a wire format: each fake brings its own JSON encoding,
error shape and routes.
"""
