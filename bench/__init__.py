"""``make bench``: the simulated provider and the gateway as separate processes, measured side
by side with calling the provider directly (throughput, latency, gateway CPU and memory, time to
first token, disconnect aborts). Not a test: it prints a table and writes ``.bench/latest.md``.
"""
