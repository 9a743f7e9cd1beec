"""HTTP ``Content-Encoding`` of bodies: undone within a size limit (``gzip``, ``deflate``), for
the server's requests and the client's answers, before the protocol codec (``_protocol``) reads
them."""

from __future__ import annotations

import zlib
from typing import TypeAlias

from modelpool._exceptions import BodyTooLarge, CodecError

__all__ = ["Buffer", "decompress"]

#: A body as received.
Buffer: TypeAlias = bytes | bytearray | memoryview


def decompress(body: Buffer, content_encoding: str | None, max_size: int) -> Buffer:
    """Undo ``Content-Encoding`` (``gzip``, ``deflate`` as zlib or raw, ``identity``).

    Decompression streams and stops with ``BodyTooLarge`` as soon as the output passes
    ``max_size`` bytes, so a small compressed bomb never expands in memory. A decompressed
    body is a fresh ``bytearray`` (decoding it is zero-copy); an identity body is returned as is.
    """
    codings = [c.strip().lower() for c in (content_encoding or "").split(",")]
    for coding in reversed([c for c in codings if c and c != "identity"]):
        if coding in ("gzip", "x-gzip"):
            body = _inflate(body, 16 + zlib.MAX_WBITS, max_size, coding)
        elif coding == "deflate":
            raw = len(body) < 2 or (body[0] & 0x0F) != 8 or (body[0] * 256 + body[1]) % 31 != 0
            body = _inflate(body, -zlib.MAX_WBITS if raw else zlib.MAX_WBITS, max_size, coding)
        else:
            raise CodecError(
                f"unsupported Content-Encoding {_quoted(coding)}; send the body uncompressed or "
                "compressed with gzip or deflate"
            )
    if len(body) > max_size:
        raise BodyTooLarge(f"the body is {len(body)} bytes; the limit is {max_size} bytes")
    return body


def _inflate(data: Buffer, wbits: int, max_size: int, coding: str) -> bytearray:
    out = bytearray()
    pending: Buffer = data
    try:
        while True:  # one round per gzip member; zlib and raw deflate have a single one
            inflater = zlib.decompressobj(wbits)
            while True:
                out += inflater.decompress(pending, max_size + 1 - len(out))
                pending = inflater.unconsumed_tail
                if inflater.eof or not pending or len(out) > max_size:
                    break
            if not inflater.eof and len(out) <= max_size:
                out += inflater.flush()  # bounded: no input is left, only zlib's window
            if len(out) > max_size:
                raise BodyTooLarge(
                    f"the body decompresses to more than {max_size} bytes, the limit"
                )
            if not inflater.eof:
                raise CodecError(f"the {coding} body is truncated; send the complete stream")
            pending = inflater.unused_data
            if not pending or coding == "deflate":
                break
    except zlib.error as exc:
        raise CodecError(f"the body is not valid {coding} data ({exc})") from None
    if pending:
        raise CodecError(f"the body has {len(pending)} stray bytes after the {coding} stream")
    return out


def _quoted(value: str) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
