"""``python -m crdt_merge`` runs the CLI."""

import sys

from crdt_merge.cli.main import main

sys.exit(main())
