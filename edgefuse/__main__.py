"""``python -m edgefuse`` runs the CLI."""

from edgefuse.cli import main

raise SystemExit(main())
