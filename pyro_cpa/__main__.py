"""``python -m pyro_cpa demo``: see :mod:`pyro_cpa.demo`."""
from .demo.cli import main

if __name__ == "__main__":
    main()
