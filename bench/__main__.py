"""`python -m bench`: see bench/runner.py."""

from .runner import main

raise SystemExit(main())
