"""interop: other tools' formats translated to and from ours (pure: no store, no replica)."""
