"""``python -m crdt_merge`` runs the CLI."""

import sys

try:
    from crdt_merge.cli.main import run
except KeyboardInterrupt:  # Ctrl-C while the program itself is still loading
    print("crdt-merge: interrupted", file=sys.stderr)
    sys.exit(130)

run()
