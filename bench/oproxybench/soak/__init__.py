"""
oproxy's soak: the daemon under moderate load for a long time while things
go wrong around it, and an account of what each fault cost.

``bench/soak.py`` is the entry point (``python bench/soak.py --help``;
bench/README.rst, "The soak", says how to read the report).  One run:

1. Starts two fake Ollamas (``twistd oproxy-fake-ollama``, each with a
   ``--stats-file``), writes a configuration with ``workers: 2`` and both
   as backends of the same models, makes API keys in the state store with
   ``oproxy keys create`` (one per reload period, so that each fault's
   cost lands on a key of its own, and one for the drain at the end), and
   starts the daemon (:mod:`.cluster`).
2. Runs clients that send a mix of streaming and non-streaming chat
   through the official ``openai`` SDK (:mod:`.load`), while the timeline
   (:mod:`.plan`) rewrites the configuration file every period, ``kill
   -9``\\ s a worker every few minutes, stops one fake Ollama and starts it
   again, and samples the memory and descriptors of the daemon's processes.
3. Stops the load, takes the last quiet sample, opens a few streams and
   sends the daemon ``SIGTERM`` in the middle of them, then stops the fakes
   (which write what they generated) and reads what each key was charged
   (``oproxy keys show NAME --json``).
4. Accounts for every failed request and every token (:mod:`.accounting`)
   and prints the report, also as JSON (:mod:`.report`).

All traffic goes to 127.0.0.1; every process it starts is stopped at the
end, on an error, or on Ctrl-C.
"""
