"""An independent verifier of a resolved checkpoint folder, written from specs/checkpoint.md.

It recomputes the checkpoint id and the plan id from the folder's files alone, and checks
the output layout rules (safetensors headers, the index, merge_manifest.json). It has its
own canonical msgpack encoder and uses ``blake3`` and the standard library only: it imports
nothing from crdt_merge, so a test that compares its answers with crdt_merge's checks
crdt_merge against an independent reading of the spec.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import blake3

RECEIPT = "merge_manifest.json"


def enc(v: object) -> bytes:
    """Canonical msgpack (specs/formats.md section 1), for the types a manifest or plan holds."""
    def head(n: int, fix: int | None, fix_max: int, codes: tuple[int, int, int]) -> bytes:
        if fix is not None and n <= fix_max:
            return bytes([fix | n])
        for code, fmt, limit in zip(codes, (">B", ">H", ">I"), (2**8, 2**16, 2**32), strict=True):
            if code and n < limit:
                return bytes([code]) + struct.pack(fmt, n)
        raise ValueError("too long")

    if v is None:
        return b"\xc0"
    if isinstance(v, bool):
        return b"\xc3" if v else b"\xc2"
    if isinstance(v, int):
        if 0 <= v < 128:
            return bytes([v])
        if v >= 0:
            for code, fmt, limit in ((0xCC, ">B", 2**8), (0xCD, ">H", 2**16),
                                     (0xCE, ">I", 2**32), (0xCF, ">Q", 2**64)):
                if v < limit:
                    return bytes([code]) + struct.pack(fmt, v)
        if -32 <= v < 0:
            return struct.pack(">b", v)
        for code, fmt, limit in ((0xD0, ">b", 2**7), (0xD1, ">h", 2**15),
                                 (0xD2, ">i", 2**31), (0xD3, ">q", 2**63)):
            if -limit <= v < 0:
                return bytes([code]) + struct.pack(fmt, v)
        raise ValueError(v)
    if isinstance(v, str):
        b = v.encode()
        return head(len(b), 0xA0, 31, (0xD9, 0xDA, 0xDB)) + b
    if isinstance(v, bytes):
        return head(len(v), None, 0, (0xC4, 0xC5, 0xC6)) + v
    if isinstance(v, list):
        return head(len(v), 0x90, 15, (0, 0xDC, 0xDD)) + b"".join(enc(x) for x in v)
    if isinstance(v, dict):
        return head(len(v), 0x80, 15, (0, 0xDE, 0xDF)) + b"".join(
            enc(k) + enc(v[k]) for k in sorted(v, key=lambda k: k.encode()))
    raise TypeError(type(v).__name__)


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def pieces(data: bytes, piece_size: int) -> list[str]:
    return [b3(data[i:i + piece_size]) for i in range(0, len(data), piece_size)]


SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
         "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def layout_problems(folder: Path) -> list[str]:
    """Where the folder breaks the output layout rules of specs/checkpoint.md section 2."""
    out = []
    shards = sorted(p.name for p in folder.iterdir() if p.name.endswith(".safetensors"))
    where: dict[str, str] = {}
    total = 0
    for name in shards:
        data = (folder / name).read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        text = data[8:8 + n]
        header = json.loads(text)
        meta = header.pop("__metadata__", None)
        if meta != {"format": "pt"}:
            out.append(f"{name}: __metadata__ is {meta!r}")
        pos, expected = 0, {}
        for key in sorted(header):
            count = 1
            for d in header[key]["shape"]:
                count *= d
            size = count * SIZES[header[key]["dtype"]]
            expected[key] = {"data_offsets": [pos, pos + size], "dtype": header[key]["dtype"],
                             "shape": header[key]["shape"]}
            pos += size
            where[key] = name
        expected["__metadata__"] = {"format": "pt"}
        canon = json.dumps(expected, sort_keys=True, separators=(",", ":")).encode()
        canon += b" " * (-len(canon) % 8)
        if text != canon:
            out.append(f"{name}: the header is not the canonical one")
        if len(data) != 8 + n + pos:
            out.append(f"{name}: {len(data) - 8 - n - pos} bytes beyond the tensors")
        total += pos
    if len(shards) == 1 and shards != ["model.safetensors"]:
        out.append(f"one shard named {shards[0]}")
    if len(shards) > 1:
        want = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        if shards != want:
            out.append(f"shards named {shards}")
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(where.items()))}
        text = (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()
        if (folder / "model.safetensors.index.json").read_bytes() != text:
            out.append("the index is not the canonical one")
    receipt = (folder / RECEIPT).read_bytes()
    if receipt != (json.dumps(json.loads(receipt), indent=2, sort_keys=True) + "\n").encode():
        out.append(f"{RECEIPT} is not canonical JSON")
    return out


def checkpoint_manifest(folder: Path, piece_size: int) -> dict:
    tensors: dict[str, dict] = {}
    files: dict[str, dict] = {}
    layout: dict[str, dict] = {}
    for path in sorted(folder.iterdir(), key=lambda p: p.name.encode()):
        if path.name == RECEIPT:
            continue
        data = path.read_bytes()
        if path.name.endswith(".safetensors"):
            (n,) = struct.unpack("<Q", data[:8])
            header = json.loads(data[8:8 + n])
            header.pop("__metadata__", None)
            ends = 8 + n
            for key, rec in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]):
                begin, end = rec["data_offsets"]
                assert 8 + n + begin == ends, "the tensors must tile the file"
                ends = 8 + n + end
                tensors[key] = {"dtype": rec["dtype"], "shape": rec["shape"],
                                "pieces": pieces(data[8 + n + begin:8 + n + end], piece_size)}
            assert ends == len(data), "bytes after the last tensor"
            layout[path.name] = {"header": pieces(data[:8 + n], piece_size), "size": len(data)}
        else:
            files[path.name] = {"size": len(data), "pieces": pieces(data, piece_size)}
    return {"v": 1, "piece_size": piece_size, "tensors": tensors, "files": files,
            "meta": {"checkpoint": 1, "safetensors": layout}}


def verify(folder: Path) -> dict:
    """The ids recomputed from the folder: checkpoint id, plan id, and what the receipt
    records; the piece size is the one the receipt records."""
    record = json.loads((folder / RECEIPT).read_bytes())
    piece_size = record["manifest"]["piece_size"]
    manifest = checkpoint_manifest(folder, piece_size)
    return {"checkpoint_id": b3(enc(manifest)), "plan_id": b3(enc(record["plan"])),
            "recorded_checkpoint_id": record["checkpoint_id"],
            "recorded_plan_id": record["plan_id"], "manifest": manifest,
            "layout_problems": layout_problems(folder)}
