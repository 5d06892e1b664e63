"""``python -m modules.quantize``: see :mod:`modules.quantize.cli`."""
import sys

from modules.quantize.cli import main

if __name__ == "__main__":
    sys.exit(main())
