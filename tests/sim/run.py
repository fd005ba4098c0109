"""Run the seeded simulation over many seeds, or replay one.

    .venv/bin/python -m tests.sim.run --seeds 1000 --jobs 2   # seeds 0..999
    .venv/bin/python -m tests.sim.run --seed 417 -v           # replay one, print its log

Prints every failing seed with its event log, then a summary; exits 1 if any seed failed.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from .simulation import SimulationFailed, run_seed


def scratch() -> tempfile.TemporaryDirectory[str]:
    """Replica directories on tmpfs when there is one: the simulation tests logic, not
    durability, and every commit fsyncs."""
    shm = Path("/dev/shm")
    base = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    return tempfile.TemporaryDirectory(dir=base, prefix="crdt-merge-sim-")


def replay(seed: int, steps: int | None) -> str:
    return (f"python -m tests.sim.run --seed {seed}" + (f" --steps {steps}" if steps else "")
            + " -v")


def one(seed: int, steps: int | None = None, verbose: bool = False) -> tuple[int, str | None, str]:
    """Run ``seed``; return (seed, failure text or None, how it ended). Any exception, not
    only a broken invariant, is a failed seed with its replay command: it never escapes
    to the process pool (where an error that does not pickle would break the whole run)."""
    with scratch() as tmp:
        try:
            outcome = run_seed(seed, Path(tmp), steps=steps,
                               echo=print if verbose else None)
        except SimulationFailed as exc:
            return seed, str(exc), "FAILED"
        except Exception as exc:  # noqa: BLE001 - every error is a result here
            trace = "".join(traceback.format_exception(exc))
            return seed, (f"seed {seed}: unexpected {type(exc).__name__}: {exc}\n"
                          f"replay: {replay(seed, steps)}\n{trace}"), "ERROR"
    return seed, None, f"{outcome.ops} ops, {outcome.resolved[:40]}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.sim.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=100, help="how many seeds (default 100)")
    ap.add_argument("--start", type=int, default=0, help="first seed (default 0)")
    ap.add_argument("--seed", type=int, help="run just this seed")
    ap.add_argument("--steps", type=int, help="workload steps per seed (default: drawn)")
    ap.add_argument("--jobs", type=int, default=1, help="processes (default 1)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each event log")
    args = ap.parse_args(argv)
    seeds = [args.seed] if args.seed is not None else list(range(args.start,
                                                                 args.start + args.seeds))
    began = time.perf_counter()
    failed: list[int] = []
    if args.jobs > 1 and len(seeds) > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            futures = {seed: pool.submit(one, seed, args.steps) for seed in seeds}
            for seed, future in futures.items():
                try:
                    _, failure, _summary = future.result()
                except Exception as exc:  # noqa: BLE001 - a worker died (killed, out of memory)
                    failure = (f"seed {seed}: the worker process failed: "
                               f"{type(exc).__name__}: {exc}\nreplay: {replay(seed, args.steps)}")
                if failure is not None:
                    failed.append(seed)
                    print(failure, flush=True)
    else:
        for seed in seeds:
            seed, failure, summary = one(seed, args.steps, args.verbose)
            if failure is not None:
                failed.append(seed)
                print(failure, flush=True)
            elif args.verbose or len(seeds) == 1:
                print(f"seed {seed}: ok, {summary}")
    wall = time.perf_counter() - began
    print(f"seeds run: {len(seeds)} ({seeds[0]}..{seeds[-1]}); passed: {len(seeds) - len(failed)};"
          f" failed: {failed or 'none'}")
    print(f"wall time: {wall:.1f} s with {args.jobs} process(es) on {platform.machine()}, "
          f"{os.cpu_count()} CPUs, Python {platform.python_version()}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
