"""``python -m qksweep ...``: the CLI (what a cluster job runs, with the head's own Python)."""

from .cli import main

raise SystemExit(main())
