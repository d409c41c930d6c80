"""gcp-storage-emulator, with its multipart upload fixed: run as ``python tests/gcs_emulator.py start ...``
(the emulator's own arguments).

Why: the emulator reads a multipart upload's parts with Python's email parser, which takes a CR at the
end of the object's bytes, followed by the LF that gcsfs puts before the closing boundary, as one CRLF
line break, and drops it. So an object whose last byte is ``\\r`` (one in 256 random payloads) came back
one byte short, and skyvm's checksum rightly called it corrupt. GCS itself keeps the bytes. Here the
parts are split at the boundary, with the line break style the upload itself uses.
"""

from __future__ import annotations

import json
import sys


def split_related(raw: bytes, content_type: str) -> dict:
    """A ``multipart/related`` upload's metadata (its first part) and content (its second), byte for byte."""
    params = dict(p.strip().split("=", 1) for p in content_type.split(";")[1:] if "=" in p)
    delimiter = b"--" + params["boundary"].strip('"').encode()
    start = raw.index(delimiter) + len(delimiter)
    newline = b"\r\n" if raw[start : start + 2] == b"\r\n" else b"\n"
    parts = []
    for part in raw[start:].split(newline + delimiter):
        if part.startswith(b"--"):  # the closing delimiter
            break
        head, _, body = part[len(newline) :].partition(newline + newline)
        headers = dict(line.split(b":", 1) for line in head.split(newline) if b":" in line)
        parts.append(({k.strip().lower().decode(): v.strip().decode() for k, v in headers.items()}, body))
    (_, meta), (headers, content) = parts[:2]
    return {"meta": json.loads(meta), "content": content, "content-type": headers.get("content-type", "application/octet-stream").split(";")[0]}


def patch() -> None:
    from gcp_storage_emulator import server

    original = server._read_data

    def read_data(request_handler, query):
        content_type = request_handler.headers.get("Content-Type") or ""
        if not content_type.startswith("multipart/related"):
            return original(request_handler, query)
        raw = server._decode_raw_data(server._read_raw_data(request_handler), request_handler)
        return split_related(raw, content_type) if raw else None

    server._read_data = read_data


if __name__ == "__main__":
    patch()
    from gcp_storage_emulator.__main__ import main

    main(sys.argv[1:])
