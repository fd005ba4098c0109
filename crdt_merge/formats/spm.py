"""SentencePiece model files (``tokenizer.model``): the few fields GGUF needs, read and
written without the sentencepiece or protobuf packages.

A ``tokenizer.model`` is a protobuf ``ModelProto`` (sentencepiece_model.proto):
``pieces`` (field 1, repeated ``{piece: string = 1, score: float = 2, type: enum = 3}``),
``trainer_spec`` (field 2: ``model_type`` = 3, ``vocab_size`` = 4, ``byte_fallback`` = 35,
``unk_id``/``bos_id``/``eos_id``/``pad_id`` = 40..43) and ``normalizer_spec`` (field 3:
``name`` = 1, ``add_dummy_prefix`` = 3, ``remove_extra_whitespaces`` = 4,
``escape_whitespaces`` = 5). :func:`read_model` reads the pieces, the model type and
``add_dummy_prefix`` (skipping every other field by its wire type); :func:`write_model`
writes a model from pieces, fields in ascending order, so the bytes are a function of the
arguments.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from crdt_merge.errors import ModelImportError

#: SentencePiece piece types (the same numbers as GGUF's token types)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
#: TrainerSpec.ModelType
MODEL_TYPES = {1: "UNIGRAM", 2: "BPE", 3: "WORD", 4: "CHAR"}


@dataclass(frozen=True)
class SpmModel:
    pieces: tuple[str, ...]
    scores: tuple[float, ...]
    types: tuple[int, ...]
    model_type: int  # 1 UNIGRAM (protobuf default), 2 BPE, ...
    add_dummy_prefix: bool  # protobuf default True


# -- protobuf wire format ----------------------------------------------------------------------

def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(data) or shift > 63:
            raise ValueError("truncated or overlong varint")
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def _fields(data: bytes) -> list[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of a message: ints for varint / fixed, bytes for
    length-delimited."""
    out: list[tuple[int, int, int | bytes]] = []
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        field, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 1:
            if i + 8 > len(data):
                raise ValueError("truncated fixed64")
            value, i = int.from_bytes(data[i:i + 8], "little"), i + 8
        elif wire == 2:
            n, i = _varint(data, i)
            if i + n > len(data):
                raise ValueError("truncated length-delimited field")
            value, i = data[i:i + n], i + n
        elif wire == 5:
            if i + 4 > len(data):
                raise ValueError("truncated fixed32")
            value, i = int.from_bytes(data[i:i + 4], "little"), i + 4
        else:
            raise ValueError(f"wire type {wire}")
        out.append((field, wire, value))
    return out


def _enc_varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32: ten bytes, two's complement
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        if value:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _enc_varint(field << 3 | wire)


def _len(field: int, payload: bytes) -> bytes:
    return _key(field, 2) + _enc_varint(len(payload)) + payload


def _int(field: int, value: int) -> bytes:
    return _key(field, 0) + _enc_varint(value)


# -- the model ---------------------------------------------------------------------------------

def read_model(data: bytes, source: str = "tokenizer.model") -> SpmModel:
    """The pieces, scores, types, model type and ``add_dummy_prefix`` of a model file.

    Raises:
        ModelImportError: not a SentencePiece model (a malformed protobuf, a piece that is
            not UTF-8, no pieces).
    """
    pieces: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    model_type, dummy = 1, True
    try:
        for field, wire, value in _fields(data):
            if field == 1 and wire == 2:
                assert isinstance(value, bytes)
                piece, score, kind = None, 0.0, NORMAL
                for f, w, v in _fields(value):
                    if f == 1 and w == 2:
                        assert isinstance(v, bytes)
                        piece = v.decode("utf-8")
                    elif f == 2 and w == 5:
                        assert isinstance(v, int)
                        score = struct.unpack("<f", v.to_bytes(4, "little"))[0]
                    elif f == 3 and w == 0:
                        assert isinstance(v, int)
                        kind = v
                if piece is None:
                    raise ValueError(f"piece {len(pieces)} has no text")
                pieces.append(piece)
                scores.append(score)
                types.append(kind)
            elif field == 2 and wire == 2:
                assert isinstance(value, bytes)
                for f, w, v in _fields(value):
                    if f == 3 and w == 0:
                        assert isinstance(v, int)
                        model_type = v
            elif field == 3 and wire == 2:
                assert isinstance(value, bytes)
                for f, w, v in _fields(value):
                    if f == 3 and w == 0:
                        dummy = bool(v)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelImportError(f"{source}: not a SentencePiece model ({exc})") from None
    if not pieces:
        raise ModelImportError(f"{source}: not a SentencePiece model (no pieces)")
    return SpmModel(tuple(pieces), tuple(scores), tuple(types), model_type, dummy)


def write_model(pieces: list[str], scores: list[float], types: list[int], *,
                special: dict[str, int], add_dummy_prefix: bool) -> bytes:
    """A BPE SentencePiece model of these pieces (``special``: the ``unk``/``bos``/``eos``/
    ``pad`` ids, -1 for none), with an identity normalizer that escapes whitespace and
    keeps it as it is, and ``byte_fallback`` when the model has byte pieces."""
    out = bytearray()
    for piece, score, kind in zip(pieces, scores, types, strict=True):
        body = _len(1, piece.encode("utf-8")) + _key(2, 5) + struct.pack("<f", score)
        out += _len(1, body + _int(3, kind))
    trainer = _int(3, 2) + _int(4, len(pieces))
    if BYTE in types:
        trainer += _int(35, 1)
    for field, name in ((40, "unk"), (41, "bos"), (42, "eos"), (43, "pad")):
        trainer += _int(field, special.get(name, -1))
    for field, name in ((45, "unk"), (46, "bos"), (47, "eos"), (48, "pad")):
        if 0 <= special.get(name, -1) < len(pieces):  # the piece names SentencePiece looks up
            trainer += _len(field, pieces[special[name]].encode("utf-8"))
    out += _len(2, trainer)
    normalizer = (_len(1, b"identity") + _int(3, int(add_dummy_prefix)) + _int(4, 0)
                  + _int(5, 1))
    out += _len(3, normalizer)
    return bytes(out)
