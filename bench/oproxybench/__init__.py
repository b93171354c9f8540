"""
oproxy's benchmark harness: throughput, latency, streaming and memory in one run.

``bench/run.py`` is the entry point (see bench/README.rst for how to read the
output).  What one run does, and where each part lives:

1. Starts a fake Ollama that costs next to nothing (:mod:`.upstreams`):
   nginx serving canned native answers (``bench/nginx.conf.template``) on
   two free loopback ports, one whose ``/api/chat`` is a non-streamed answer
   and one whose ``/api/chat`` is a ~300-line NDJSON stream (nginx cannot
   read the body, and oproxy always POSTs to ``/api/chat``), plus a paced
   upstream that sends the first line of the stream alone, as a model does.
2. For each target -- the upstream directly (the baseline, sent native
   Ollama requests), oproxy with ``workers: 1``, oproxy with ``workers: 2``,
   and oproxy serving response-cache hits -- starts the real daemon
   (:mod:`.daemon`), checks one request of each scenario by hand
   (:mod:`.probes`), warms up, and runs wrk (:mod:`.load`) at high load and
   at moderate load; time to first byte is measured with a raw-socket client
   (:mod:`.ttfb`).  All of this is :mod:`.measure`; the targets that compare
   two rows are measured again in alternating rounds (:mod:`.rounds`).
3. Drives a fresh 1-worker proxy through an exact number of requests and
   reads VmRSS of the daemon and its children at two points (:mod:`.memory`).
4. Judges the results against the performance targets (:mod:`.criteria`)
   and prints them as reStructuredText tables, optionally as JSON
   (:mod:`.report`).
5. Stops every process it started (:mod:`.processes`: each runs in its own
   session, and the whole process tree is killed), even on Ctrl-C or an
   error (:mod:`.cli`).

Only the standard library is used.  All traffic goes to 127.0.0.1; every
load run is bounded in time, every loop in count.
"""
