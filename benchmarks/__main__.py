"""``python -m benchmarks``: see :mod:`benchmarks.run`."""

import os

# the CPU peak-memory measurement uses the profiler; keep its C++ chatter off stderr
os.environ.setdefault("KINETO_LOG_LEVEL", "5")

from .run import main  # noqa: E402

raise SystemExit(main())
