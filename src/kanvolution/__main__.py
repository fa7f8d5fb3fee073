"""``python -m kanvolution``: the same as the ``kanvolution`` command."""

import sys

from kanvolution.cli import main

if __name__ == "__main__":
    sys.exit(main())
