"""``python -m pyro_cpa demo``: see :mod:`pyro_cpa.demo`."""
import sys

from .demo.cli import console

if __name__ == "__main__":
    sys.exit(console())
