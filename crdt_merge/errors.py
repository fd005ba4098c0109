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
    │   ├── BadParameter
    │   └── UnsupportedFeature          a mergekit config feature crdt-merge does not support
    ├── ModelImportError (ValueError)   a model file that cannot be read
    │   └── UnknownFamily               no supported architecture family matches
    ├── PlanError                       resolve cannot build a plan (no recipe, no anchor...)
    ├── ShapeMismatch (ValueError)      tensors whose sizes, shapes or dtypes do not fit
    │                                   together (inputs of a merge, pieces of a record,
    │                                   parts of a fused tensor)
    └── SyncError
        ├── PeerError                   a peer answered something the protocol does not allow
        └── TransportError              the HTTP transport's own errors
            ├── Unauthenticated (PermissionError)   401: no bearer token, or an unknown one
            ├── Forbidden (PermissionError)         403: the token lacks the scope
            ├── BodyTooLarge (ValueError)           413: a body over the server's limit
            ├── RequestTimeout (TimeoutError)       408: a body that stalled or trickled
            ├── HeadersTooLarge (ValueError)        431: too many or too large headers
            └── PeerUnreachable (ConnectionError)   the connection failed or broke

Each class says what to do next in its message. ``code`` values are stable: the HTTP service
returns them as ``{code, detail}`` and the client maps them back to these classes with
:func:`error_for_code`, through the explicit table :data:`CODES` (every error is defined in
this module, so every code decodes whatever else was imported).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


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


class GenesisCorrupt(StoreError):
    """The project's genesis op is gone or fails its id in the index, and so does the copy
    kept beside it (``genesis.op``): the replica cannot open until it is put back."""

    code = "genesis_corrupt"

    def __init__(self, path: str, genesis: str) -> None:
        super().__init__(
            f"{path}: the project's genesis op {genesis} is missing or corrupt, in the index "
            "and in its copy genesis.op; put it back from any member's replica, server or "
            f"genesis file: `crdt-merge fsck {path} --genesis PEER_OR_FILE`")
        self.path = path
        self.genesis = genesis


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


class UnsupportedFeature(RecipeError):
    """A mergekit config uses a feature crdt-merge does not translate (yet)."""

    code = "unsupported_mergekit_feature"


class ModelImportError(CrdtMergeError, ValueError):
    code = "bad_model"


class PlanError(CrdtMergeError):
    code = "plan_error"


class UnknownFamily(ModelImportError):
    """No supported family matches the model; the message names what was seen."""

    code = "unknown_family"

    def __init__(
        self,
        reason: str,
        model_type: Any = None,
        architectures: Iterable[str] = (),
        sample: Iterable[str] = (),
        supported: Iterable[str] = (),
    ) -> None:
        self.model_type = model_type
        self.architectures = list(architectures)
        self.sample = list(sample)
        super().__init__(
            f"{reason} (model_type={model_type!r}, architectures={self.architectures}, "
            f"tensors such as {self.sample}); supported families: "
            f"{', '.join(supported)}. Run `crdt-merge families list`."
        )


class ShapeMismatch(CrdtMergeError, ValueError):
    """Tensors that do not fit together: a merge's inputs of different shapes, a record's
    pieces that do not add up to its size, a dtype resolve cannot merge, the parts of a
    fused tensor. Raised by the store, the methods, the families and resolve alike."""

    code = "shape_mismatch"


# -- sync -------------------------------------------------------------------------------------


class SyncError(CrdtMergeError):
    code = "sync_error"


class PeerError(SyncError):
    code = "peer_error"


class TransportError(SyncError):
    code = "transport_error"


class Unauthenticated(TransportError, PermissionError):
    code = "unauthenticated"


class Forbidden(TransportError, PermissionError):
    code = "forbidden"


class BodyTooLarge(TransportError, ValueError):
    code = "body_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is larger than this server's limit of {limit} "
                         "bytes; send smaller batches")
        self.limit = limit


class RequestTimeout(TransportError, TimeoutError):
    code = "request_timeout"

    def __init__(self, seconds: float, received: int) -> None:
        super().__init__(f"the request body stalled or arrived too slowly ({received} bytes in "
                         f"{seconds:.1f} s); send it again on a better connection")
        self.received = received


class HeadersTooLarge(TransportError, ValueError):
    code = "headers_too_large"

    def __init__(self, limit: int, count: int) -> None:
        super().__init__(f"the request line and headers are over this server's limit of "
                         f"{limit} bytes or {count} headers")
        self.limit = limit
        self.count = count


class PeerUnreachable(TransportError, ConnectionError):
    code = "peer_unreachable"


# -- the code table -----------------------------------------------------------------------------

#: code -> error class: every error of the tree above, written out (a new error class is
#: added here; tests/foundation/test_tables.py checks that none is missing)
CODES: dict[str, type[CrdtMergeError]] = {cls.code: cls for cls in (
    CrdtMergeError,
    FormatError, NonCanonicalEncoding, SchemaError, BadId, AmbiguousId,
    IntegrityError, HashMismatch, BadSignature,
    StoreError, PieceMissing, PieceCorrupt, NotAReplica, GenesisCorrupt, ReplicaExists,
    OutputExists,
    OpError, WrongProject, UnknownSite, NotAuthorized, SiteTaken, LastAdmin, Revoked,
    BadClock, DependencyMissing, OpMissing, IncompleteOp,
    RecipeError, UnknownMethod, BadParameter, UnsupportedFeature,
    ModelImportError, UnknownFamily,
    PlanError,
    ShapeMismatch,
    SyncError, PeerError, TransportError, Unauthenticated, Forbidden, BodyTooLarge,
    RequestTimeout, HeadersTooLarge, PeerUnreachable,
)}


def error_for_code(code: str) -> type[CrdtMergeError]:
    """The error class whose ``code`` is ``code`` (the root class when none matches)."""
    return CODES.get(code, CrdtMergeError)
