"""`python -m reactor` is the `reactor` command."""

from .cli import main

raise SystemExit(main())
