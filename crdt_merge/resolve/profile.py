"""profile: what a checkpoint's bytes may depend on beyond its plan (DESIGN section 4).

:func:`numeric_profile` names the engine, its numeric rules, torch and the CPU; for a
method whose bytes go through BLAS/LAPACK also MKL and its reproducibility mode.
:func:`checkpoint_key` is where a replica caches a resolved checkpoint id: under the plan
id and this profile, so a checkpoint computed under another profile is never reported as
this one's.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import os
import platform
import re

from crdt_merge import ENGINE
from crdt_merge.hashing import digest
from crdt_merge.lazy import torch
from crdt_merge.methods import get_method
from crdt_merge.numeric import NUMERIC_VERSION

__all__ = ["checkpoint_key", "numeric_profile"]


def numeric_profile(method: str | None = None) -> dict[str, str]:
    """What the bytes of a checkpoint of ``method`` may depend on beyond the plan (DESIGN
    section 4): the engine, its numeric rules, torch and the CPU architecture, recorded for
    every method although elementwise work is exact everywhere; for a method whose bytes go
    through BLAS/LAPACK (``Method.blas``: cross_family's products and eigensolvers), also
    the BLAS build torch ships (MKL's version) and MKL's reproducibility mode (``MKL_CBWR``,
    set to COMPATIBLE by this package unless the user set it). Only that part imports
    torch (to ask it); ``method`` None is the profile of no plan."""
    profile = {"engine": ENGINE, "numeric": NUMERIC_VERSION, "torch": _torch_version(),
               "arch": platform.machine()}
    if method is not None and get_method(method).blas:
        profile.update(blas="mkl" if torch.backends.mkl.is_available() else "none",
                       mkl=_mkl_version(), mkl_cbwr=os.environ.get("MKL_CBWR", ""))
    return profile


def checkpoint_key(plan_id: str, method: str) -> str:
    """The replica metadata key under which a resolved checkpoint id is cached: the plan
    id and this process's numeric profile for the plan's method, so a checkpoint computed
    under another profile (another torch, or for cross_family another MKL or
    ``MKL_CBWR``) is never reported as this one's."""
    profile = digest(json.dumps(numeric_profile(method), sort_keys=True).encode())
    return f"checkpoint/v2:{plan_id}:{profile[:16]}"  # v2: the id covers every file


@functools.cache
def _torch_version() -> str:
    """torch's version (``2.13.0+cpu``) from its installed metadata: equal to
    ``torch.__version__``, without importing torch."""
    return importlib.metadata.version("torch")


@functools.cache
def _mkl_version() -> str:
    """MKL's version as torch reports it (``2024.2-Product Build 20240605``), or ``""``."""
    m = re.search(r"Math Kernel Library Version ([^ ]+(?: Build \d+)?)", torch.__config__.show())
    return m.group(1) if m else ""
