"""torch, imported the first time it is used rather than when a module is imported.

Importing torch takes over a second, and much of crdt-merge never needs it: the op set, the
store, sync, planning a resolve, and the elementwise merges (linear, task arithmetic), whose
kernels are numpy. Modules write ``from crdt_merge.lazy import torch`` and use ``torch.x``
as usual; the first attribute looked up imports the real module (MKL_CBWR is set by then:
``crdt_merge/__init__`` sets it before any of our modules runs). Code at module level must
not look anything up on it, or the import happens there.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any


class _LazyTorch:
    """Stands in for the ``torch`` module; every attribute comes from the real one."""

    __slots__ = ()

    def __getattr__(self, name: str) -> Any:
        module = sys.modules.get("torch")
        if module is None or getattr(module.__spec__, "_initializing", False):
            # the import system's module lock: a thread arriving while another imports
            # torch waits for the whole module
            module = importlib.import_module("torch")
        return getattr(module, name)

    def __repr__(self) -> str:
        return "<torch, imported on first use>" if not loaded() else repr(sys.modules["torch"])


torch: Any = _LazyTorch()


def loaded() -> bool:
    """Whether torch has been imported in this process (by us or anyone else)."""
    return "torch" in sys.modules
