"""``python -m crdt_merge`` runs the CLI."""

from crdt_merge.cli.main import run

run()
