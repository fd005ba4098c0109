"""``python -m crdt_merge`` runs the CLI."""

import os
import sys

try:
    from crdt_merge.cli.main import run
except KeyboardInterrupt:  # Ctrl-C while the program itself is still loading
    print("crdt-merge: interrupted", file=sys.stderr, flush=True)
    os._exit(130)

run()
