"""crdt_merge.families imports only the layers below it (STYLE: layering)."""

from __future__ import annotations

import ast
from pathlib import Path

import crdt_merge.families

ALLOWED = {"crdt_merge.errors", "crdt_merge.lazy", "crdt_merge.hashing", "crdt_merge.codec", "crdt_merge.numeric",
           "crdt_merge.families"}


def test_families_imports_nothing_above_it() -> None:
    root = Path(crdt_merge.families.__file__).parent
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name == "crdt_merge" or name.startswith("crdt_merge."):
                    assert any(name == a or name.startswith(a + ".") for a in ALLOWED), (path.name, name)
                assert not name.startswith(("transformers", "fastapi")), (path.name, name)
