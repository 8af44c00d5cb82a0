"""`python -m bench.sim`: see bench/sim/cli.py."""

from .cli import main

raise SystemExit(main())
