"""A seeded, deterministic multi-replica simulation with a faulty network (see
:mod:`tests.sim.simulation`); ``python -m tests.sim.run --seeds 1000`` runs many seeds."""
