"""Write checkpoint.json, the golden vectors of specs/checkpoint.md (``python make_vectors.py``).

Built from the spec alone, with a small canonical msgpack encoder of our own, ``blake3``
and the standard library: nothing from crdt_merge. The folders are described by their
files: each safetensors file by its tensors (a fill rule, specs/formats.md section 4) and
the exact header bytes the spec's rules give, each other file by its text; then the
checkpoint manifest and id. Plans: the wire form and plan id. Running this again must
reproduce the file byte for byte (tests/resolve/test_checkpoint_vectors.py checks it).
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import blake3

OUT = Path(__file__).resolve().parent
PIECE_SIZE = 4096
SIZES = {"F32": 4, "BF16": 2, "I32": 4}


def enc(v: object) -> bytes:
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
        for code, fmt, lo, hi in ((0xCC, ">B", 0, 2**8), (0xCD, ">H", 0, 2**16),
                                  (0xCE, ">I", 0, 2**32), (0xCF, ">Q", 0, 2**64)):
            if lo <= v < hi:
                return bytes([code]) + struct.pack(fmt, v)
        if -32 <= v < 0:
            return struct.pack(">b", v)
        for code, fmt, bits in ((0xD0, ">b", 7), (0xD1, ">h", 15), (0xD2, ">i", 31), (0xD3, ">q", 63)):
            if -(2**bits) <= v < 0:
                return bytes([code]) + struct.pack(fmt, v)
        raise ValueError(v)
    if isinstance(v, str):
        b = v.encode()
        return head(len(b), 0xA0, 31, (0xD9, 0xDA, 0xDB)) + b
    if isinstance(v, list):
        return head(len(v), 0x90, 15, (0, 0xDC, 0xDD)) + b"".join(enc(x) for x in v)
    if isinstance(v, dict):
        return head(len(v), 0x80, 15, (0, 0xDE, 0xDF)) + b"".join(
            enc(k) + enc(v[k]) for k in sorted(v, key=lambda k: k.encode()))
    raise TypeError(type(v).__name__)


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def pieces(data: bytes) -> list[str]:
    return [b3(data[i:i + PIECE_SIZE]) for i in range(0, len(data), PIECE_SIZE)]


def fill_bytes(dtype: str, count: int, fill: dict) -> bytes:
    """The fill rule of specs/formats.md section 4."""
    if fill["kind"] == "zeros":
        values = [0] * count
    elif fill["kind"] == "ones":
        values = [1] * count
    else:
        values = [(i % fill["mod"]) + fill["offset"] for i in range(count)]
    if dtype == "F32":
        return struct.pack(f"<{count}f", *values)
    if dtype == "BF16":
        return b"".join(struct.pack("<f", float(x))[2:] for x in values)
    return struct.pack(f"<{count}i", *values)


TENSORS = [  # name, dtype, shape, fill
    ("model.embed.weight", "F32", [3, 1000], {"kind": "mod", "mod": 251, "offset": -125}),
    ("model.norm.weight", "BF16", [8], {"kind": "mod", "mod": 7, "offset": -3}),
    ("model.layers.0.w", "F32", [2048], {"kind": "zeros"}),
    ("model.empty", "F32", [0, 4], {"kind": "zeros"}),
    ("lm_head.weight", "I32", [3, 5], {"kind": "mod", "mod": 9, "offset": -4}),
]
CONFIG = '{\n  "architectures": [\n    "LlamaForCausalLM"\n  ],\n  "torch_dtype": "float32"\n}\n'
CARD = "---\nlibrary_name: transformers\n---\n\n# Merged model\n\n- plan id: `(a plan id)`\n"


def nbytes(dtype: str, shape: list[int]) -> int:
    n = SIZES[dtype]
    for d in shape:
        n *= d
    return n


def shards(limit: int) -> list[list[tuple]]:
    """Section 2.1: name order; a new shard when the current one is not empty and the
    tensor would pass the limit."""
    out: list[list[tuple]] = [[]]
    size = 0
    for t in sorted(TENSORS):
        n = nbytes(t[1], t[2])
        if out[-1] and size + n > limit:
            out.append([])
            size = 0
        out[-1].append(t)
        size += n
    return out


def safetensors(tensors: list[tuple]) -> tuple[bytes, bytes]:
    header: dict = {"__metadata__": {"format": "pt"}}
    pos, data = 0, b""
    for name, dtype, shape, fill in sorted(tensors):
        raw = fill_bytes(dtype, nbytes(dtype, shape) // SIZES[dtype], fill)
        header[name] = {"data_offsets": [pos, pos + len(raw)], "dtype": dtype, "shape": shape}
        pos += len(raw)
        data += raw
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()
    text += b" " * (-len(text) % 8)
    prefix = struct.pack("<Q", len(text)) + text
    return prefix, prefix + data


def folder(name: str, limit: int) -> dict:
    groups = shards(limit)
    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    files_out, tensors, layout, texts = [], {}, {}, {"README.md": CARD, "config.json": CONFIG}
    weight_map, total = {}, 0
    for file_name, group in zip(names, groups, strict=True):
        prefix, data = safetensors(group)
        for t_name, dtype, shape, fill in group:
            raw = fill_bytes(dtype, nbytes(dtype, shape) // SIZES[dtype], fill)
            tensors[t_name] = {"dtype": dtype, "shape": shape, "pieces": pieces(raw)}
            weight_map[t_name] = file_name
            total += len(raw)
        layout[file_name] = {"header": pieces(prefix), "size": len(data)}
        files_out.append({"name": file_name, "tensors": [
            {"name": n, "dtype": d, "shape": s, "fill": f} for n, d, s, f in sorted(group)],
            "header_hex": prefix.hex(), "size": len(data), "blake3": b3(data)})
    if len(groups) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        texts["model.safetensors.index.json"] = json.dumps(index, indent=2, sort_keys=True) + "\n"
    files = {n: {"size": len(t.encode()), "pieces": pieces(t.encode())} for n, t in texts.items()}
    manifest = {"v": 1, "piece_size": PIECE_SIZE, "tensors": tensors, "files": files,
                "meta": {"checkpoint": 1, "safetensors": layout}}
    return {"name": name, "max_shard_size": limit, "safetensors": files_out,
            "texts": dict(sorted(texts.items())), "manifest": manifest,
            "manifest_hex": enc(manifest).hex(), "checkpoint_id": b3(enc(manifest))}


A, B, M1, M2 = "a1" * 32, "b2" * 32, "c3" * 32, "d4" * 32
PLANS = [
    ("task arithmetic, anchored, bfloat16 output", {
        "v": 1, "numeric": "1", "method": "task_arithmetic", "params": {"lambda": "0.5"},
        "base": M1, "dtype": "BF16", "seed": "", "allow_nonfinite": False,
        "contributions": [
            {"op_id": A, "site": "alpha", "label": "ft-a", "manifest": M2, "form": "full",
             "params": {"weight": "1"}, "base": M1},
            {"op_id": B, "site": "beta", "label": "ft-b", "manifest": M1, "form": "full",
             "params": {"weight": "-0.25"}}]}),
    ("linear without a base, seeded", {
        "v": 1, "numeric": "1", "method": "linear", "params": {}, "base": "",
        "dtype": "", "seed": "run-7", "allow_nonfinite": True,
        "contributions": [
            {"op_id": A, "site": "alpha", "label": "", "manifest": M2, "form": "full",
             "params": {}}]}),
]


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    value = {
        "piece_size": PIECE_SIZE,
        "folders": [folder("one shard", 5 * 1024**3), folder("four shards", 8192)],
        "plans": [{"name": n, "plan": p, "hex": enc(p).hex(), "plan_id": b3(enc(p))}
                  for n, p in PLANS],
    }
    (out / "checkpoint.json").write_text(json.dumps(value, indent=1, ensure_ascii=True) + "\n")


if __name__ == "__main__":
    main()
