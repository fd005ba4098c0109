"""Tests of the cross-family method, its maths and `crdt-merge eval`."""
