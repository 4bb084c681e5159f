"""`python -m load_tests`: see `load_tests/cli.py` for the options and examples."""

from load_tests.cli import main

raise SystemExit(main())
