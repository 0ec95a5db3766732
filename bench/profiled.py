"""``python -m bench.profiled OUT``: run ``python -m service`` under cProfile and dump the stats
to ``OUT`` when it exits (SIGTERM included).

The profiler's clock is the process's CPU time, not the wall clock: the gateway shares two
cores with the load client and the provider, and wall time would charge whichever function
happened to be running when the scheduler preempted the process. Read the output with
``python -m pstats OUT`` (``sort tottime``, ``stats 40``).
"""

from __future__ import annotations

import cProfile
import runpy
import sys
import time


def main() -> None:
    out = sys.argv[1]
    sys.argv = ["service"]
    profiler = cProfile.Profile(time.process_time)
    try:
        profiler.runcall(runpy.run_module, "service", run_name="__main__", alter_sys=True)
    finally:
        profiler.dump_stats(out)


if __name__ == "__main__":
    main()
