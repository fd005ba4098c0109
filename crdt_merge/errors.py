"""Every error crdt-merge raises, each with a stable ``code`` a server and a client share.

The tree::

    CrdtMergeError
    ├── FormatError (ValueError)
    │   ├── NonCanonicalEncoding        bytes that do not re-encode to themselves
    │   ├── SchemaError                 well-formed msgpack of the wrong shape
    │   ├── BadId                       not 64 lowercase hex characters
    │   └── AmbiguousId (LookupError)   an id prefix that several held ids start with
    ├── IntegrityError (ValueError)
    │   ├── HashMismatch                bytes whose BLAKE3 is not the id they came with
    │   └── BadSignature                an op whose Ed25519 signature does not verify
    ├── StoreError
    │   ├── PieceMissing (LookupError)  an object this replica does not hold
    │   ├── PieceCorrupt                a stored object that fails its hash (quarantined)
    │   ├── NotAReplica (FileNotFoundError)
    │   ├── ReplicaExists (FileExistsError)
    │   └── OutputExists (FileExistsError)   resolve --out names a folder that is not a checkpoint
    ├── OpError
    │   ├── WrongProject                an op or peer of another genesis
    │   ├── UnknownSite                 an op whose membership reference is not held
    │   ├── NotAuthorized (PermissionError)  a non-admin admitting a site
    │   │   ├── SiteTaken                a second admit of a name a live member holds
    │   │   ├── LastAdmin                a revoke that would leave no live admin
    │   │   └── Revoked                  authoring with a key that was revoked or replaced
    │   ├── BadClock                    a clock that is not 1 + the greatest clock of its deps
    │   ├── DependencyMissing           an op whose deps are not all held (it waits)
    │   ├── OpMissing (LookupError)     an op id this replica does not hold
    │   └── IncompleteOp                an op whose objects are not all present
    ├── RecipeError (ValueError)
    │   ├── UnknownMethod
    │   └── BadParameter
    ├── ModelImportError (ValueError)   a model file that cannot be read
    │   └── UnknownFamily               no supported architecture family matches
    │                                   (defined in crdt_merge.families.detect)
    ├── PlanError                       resolve cannot build a plan (no recipe, no anchor...)
    │   └── ShapeMismatch (ValueError)
    └── SyncError
        └── PeerError                   a peer answered something the protocol does not allow

Each class says what to do next in its message. ``code`` values are stable: the HTTP service
returns them as ``{code, detail}`` and the client maps them back to these classes with
:func:`error_for_code`.
"""

from __future__ import annotations


class CrdtMergeError(Exception):
    """Root of every error this package raises on purpose."""

    code = "crdt_merge_error"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def __reduce__(self) -> tuple[object, ...]:
        """Pickle by message and attributes, not by constructor arguments: subclasses take
        other arguments than the message (``IncompleteOp(op_id, missing)``), and an error
        raised in a worker process must reach the parent intact."""
        return _rebuild, (type(self), self.detail, dict(self.__dict__))


def _rebuild(cls: type[CrdtMergeError], detail: str, state: dict[str, object]) -> CrdtMergeError:
    err = cls.__new__(cls)
    Exception.__init__(err, detail)
    err.__dict__.update(state)
    return err


# -- formats ----------------------------------------------------------------------------------


class FormatError(CrdtMergeError, ValueError):
    code = "format_error"


class NonCanonicalEncoding(FormatError):
    code = "non_canonical"


class SchemaError(FormatError):
    code = "schema_error"


class BadId(FormatError):
    code = "bad_id"

    def __init__(self, value: object, what: str = "id") -> None:
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        super().__init__(f"{what} {shown} is not 64 lowercase hex characters")
        self.value = value


class AmbiguousId(FormatError, LookupError):
    code = "ambiguous_id"

    def __init__(self, prefix: str, matches: list[str]) -> None:
        shown = ", ".join(m[:16] for m in matches[:4]) + (" ..." if len(matches) > 4 else "")
        super().__init__(f"id prefix {prefix!r} matches {len(matches)} ops ({shown}); "
                         "give more characters")
        self.prefix = prefix
        self.matches = matches


# -- integrity --------------------------------------------------------------------------------


class IntegrityError(CrdtMergeError, ValueError):
    code = "integrity_error"


class HashMismatch(IntegrityError):
    code = "hash_mismatch"

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(
            f"bytes hash to {actual}, not {expected}; they were corrupted or truncated in "
            "transit: fetch them again"
        )
        self.expected = expected
        self.actual = actual


class BadSignature(IntegrityError):
    code = "bad_signature"


# -- store ------------------------------------------------------------------------------------


class StoreError(CrdtMergeError):
    code = "store_error"


class PieceMissing(StoreError, LookupError):
    code = "piece_missing"

    def __init__(self, piece_id: str) -> None:
        super().__init__(
            f"object {piece_id} is not in this replica; sync with a peer that has it"
        )
        self.piece_id = piece_id


class PieceCorrupt(StoreError):
    code = "piece_corrupt"

    def __init__(self, piece_id: str, path: str) -> None:
        super().__init__(
            f"stored object {piece_id} fails its hash and was moved to {path}; "
            "run `crdt-merge sync` with a peer to fetch it again"
        )
        self.piece_id = piece_id
        self.path = path


class NotAReplica(StoreError, FileNotFoundError):
    code = "not_a_replica"

    def __init__(self, path: str) -> None:
        super().__init__(f"{path} is not a replica directory; create one with `crdt-merge init`")
        self.path = path


class ReplicaExists(StoreError, FileExistsError):
    code = "replica_exists"

    def __init__(self, path: str) -> None:
        super().__init__(f"{path} already holds a replica; choose an empty directory")
        self.path = path


class OutputExists(StoreError, FileExistsError):
    code = "output_exists"

    def __init__(self, path: str) -> None:
        super().__init__(f"{path} exists and is not a checkpoint folder written by resolve; "
                         "choose a new or empty folder")
        self.path = path


# -- ops --------------------------------------------------------------------------------------


class OpError(CrdtMergeError):
    code = "op_error"


class WrongProject(OpError):
    code = "wrong_project"

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(
            f"this belongs to merge project {actual}, this replica to {expected}; "
            "replicas of different projects never sync"
        )
        self.expected = expected
        self.actual = actual


class UnknownSite(OpError):
    code = "unknown_site"


class NotAuthorized(OpError, PermissionError):
    code = "not_authorized"


class SiteTaken(NotAuthorized):
    code = "site_taken"


class LastAdmin(NotAuthorized):
    code = "last_admin"


class Revoked(NotAuthorized):
    code = "revoked"


class BadClock(OpError):
    code = "bad_clock"


class DependencyMissing(OpError):
    code = "dependency_missing"


class OpMissing(OpError, LookupError):
    code = "op_missing"

    def __init__(self, op_id: str) -> None:
        super().__init__(f"op {op_id} is not in this replica; sync with a peer that has it")
        self.op_id = op_id


class IncompleteOp(OpError):
    code = "incomplete_op"

    def __init__(self, op_id: str, missing: list[str], detail: str | None = None) -> None:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        super().__init__(detail or (
            f"op {op_id} references {len(missing)} object(s) this replica lacks ({shown}); "
            "send the objects before the op"
        ))
        self.op_id = op_id
        self.missing = missing


# -- recipes, import, plan ----------------------------------------------------------------------


class RecipeError(CrdtMergeError, ValueError):
    code = "bad_recipe"


class UnknownMethod(RecipeError):
    code = "unknown_method"


class BadParameter(RecipeError):
    code = "bad_parameter"


class ModelImportError(CrdtMergeError, ValueError):
    code = "bad_model"


class PlanError(CrdtMergeError):
    code = "plan_error"


class ShapeMismatch(PlanError, ValueError):
    code = "shape_mismatch"


# -- sync -------------------------------------------------------------------------------------


class SyncError(CrdtMergeError):
    code = "sync_error"


class PeerError(SyncError):
    code = "peer_error"


def _all_subclasses(cls: type) -> list[type]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


def error_for_code(code: str) -> type[CrdtMergeError]:
    """The error class whose ``code`` is ``code`` (the root class when none matches)."""
    for cls in _all_subclasses(CrdtMergeError):
        if cls.__dict__.get("code") == code:
            return cls
    return CrdtMergeError
