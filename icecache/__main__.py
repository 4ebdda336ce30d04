"""`python -m icecache ...`: the same as the `icecache` command."""

from .cli import main

raise SystemExit(main())
