"""``python -m skanomaly``: the same as the ``skanomaly`` command (:func:`skanomaly.cli.main`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
