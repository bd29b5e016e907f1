"""``python -m benchmarks``: fix the environment first, then import NumPy and run."""

import sys

from benchmarks.environment import ensure_environment

if __name__ == "__main__":
    ensure_environment(sys.argv[1:])
    from benchmarks.cli import main

    sys.exit(main(sys.argv[1:]))
