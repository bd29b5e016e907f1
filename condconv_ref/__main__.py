"""``python -m condconv_ref``: the ``condconv-ref`` command (:mod:`condconv_ref.cli`), for
environments where the console script is not on ``PATH``."""

import sys

from condconv_ref.cli import main

if __name__ == "__main__":
    sys.exit(main())
