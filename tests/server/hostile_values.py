"""Hostile request parts shared by the fuzz, amplification and soak tests: the worst request of each class the
security review found (stop strings, schemas, nested strings parsed later, images) and raw-JSON values Python's
`json.dumps` will not write (huge integers, NaN / Infinity)."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib

from PIL import Image

# Raw-JSON placeholders: `dumps_raw` replaces these quoted markers by the literal text.
RAW = {
    "__HUGE_INT__": "9" * 5000,
    "__BIG_INT__": "1" + "0" * 120,
    "__NEG_HUGE_INT__": "-" + "7" * 4400,
    "__NAN__": "NaN",
    "__INF__": "Infinity",
    "__NEG_INF__": "-Infinity",
    "__OVERFLOW__": "1e999",
}


def dumps_raw(body: object) -> bytes:
    """JSON of `body` (ASCII-escaped, so lone surrogates go out as `\\udXXX`), raw markers spliced in."""
    text = json.dumps(body)
    for marker, raw in RAW.items():
        text = text.replace(json.dumps(marker), raw)
    return text.encode()


def dag_schema(depth: int = 20) -> dict:
    """A small schema whose `$ref`s form a DAG (each level referenced twice): 2**depth nodes if expanded naively."""
    defs = {f"d{i}": {"type": "object", "properties": {"a": {"$ref": f"#/$defs/d{i + 1}"},
                                                        "b": {"$ref": f"#/$defs/d{i + 1}"}}} for i in range(depth)}
    defs[f"d{depth}"] = {"type": "string"}
    return {"type": "object", "properties": {"root": {"$ref": "#/$defs/d0"}}, "$defs": defs}


def recursive_schema() -> dict:
    return {"$ref": "#/$defs/node", "$defs": {"node": {"type": "object", "properties": {
        "value": {"type": "string"}, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}}}


def ref_chain_schema(length: int = 3000) -> dict:
    defs = {f"c{i}": {"$ref": f"#/$defs/c{i + 1}"} for i in range(length)}
    defs[f"c{length}"] = {"type": "string"}
    return {"type": "object", "properties": {"x": {"$ref": "#/$defs/c0"}}, "$defs": defs}


def huge_items_schema() -> dict:
    return {"type": "object", "properties": {"xs": {"type": "array", "minItems": "__HUGE_INT__",
                                                    "maxItems": "__BIG_INT__", "items": {"type": "string"}}}}


def many_stop_strings(count: int = 50_000) -> list[str]:
    return [f"stop-{i:05d}-never" for i in range(count)]


def deep_arguments(depth: int = 20_000) -> str:
    return "[" * depth + "]" * depth


def tool(name: str, parameters: dict | None = None) -> dict:
    return {"type": "function", "function": {"name": name, "description": "a tool",
                                             "parameters": parameters or {"type": "object", "properties": {}}}}


def big_png(width: int, height: int, bit_depth: int = 8, color_type: int = 2) -> bytes:
    """A valid PNG of zero pixels (compresses to almost nothing); color type 0 gray, 2 RGB, 6 RGBA."""
    channels = {0: 1, 2: 3, 6: 4}[color_type]

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    row = b"\x00" * (1 + width * channels * bit_depth // 8)
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def small_png_url(size=(64, 48), color=(30, 140, 220)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return data_url(buf.getvalue())
