"""Model families: native tensor names <-> one canonical namespace, losslessly.

Every supported architecture family maps its tensors to canonical ``(stack, layer, role)``
names and back (DESIGN section 6, step 1; the namespace, roles, compatibility classes and
fused layouts are normative in specs/families.md)::

    family = detect(config, tensors)              # from config.json + tensor names
    model = family.to_canonical(tensors, config)  # CanonicalModel
    native = family.from_canonical(model)         # the same tensors, bit for bit

Families are data (``data/*.json``); code covers only fused tensors and transposes.
"""

from crdt_merge.families.canonical import (
    ROLE_ATTRIBUTES,
    CanonicalKey,
    CanonicalModel,
    parse_name,
    role_of,
)
from crdt_merge.families.check import check, compare, load_folder
from crdt_merge.families.detect import (
    LAYER_COUNT_KEYS,
    UnknownFamily,
    detect,
    get_family,
    layer_count,
    list_families,
)
from crdt_merge.families.family import Family

__all__ = [
    "ROLE_ATTRIBUTES",
    "CanonicalKey",
    "CanonicalModel",
    "Family",
    "LAYER_COUNT_KEYS",
    "UnknownFamily",
    "check",
    "compare",
    "detect",
    "get_family",
    "layer_count",
    "list_families",
    "load_folder",
    "parse_name",
    "role_of",
]
