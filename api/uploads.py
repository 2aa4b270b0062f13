"""Streaming multipart uploads: the request body is parsed as it arrives and the `file` part is
written to a temporary file, so the size limit is enforced while bytes arrive (python-multipart's
form parsing in FastAPI would spool the whole part first)."""
from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from jobs.errors import BadRequest, UnsupportedMediaType, UploadTooLarge

FIELD_LIMIT = 64 * 1024  # per non-file form field
OVERHEAD = 256 * 1024  # multipart boundaries, part headers and small fields
DRAIN_LIMIT = 64 * 1024 * 1024  # read (and drop) at most this much of a refused body


@dataclass
class Upload:
    path: Path
    filename: str = ""
    size: int = 0
    fields: dict[str, str] = field(default_factory=dict)


class _PartCollector:
    """Callbacks for python-multipart's push parser."""

    def __init__(self, dest: Path, max_bytes: int, file_field: str) -> None:
        self.dest, self.max_bytes, self.file_field = dest, max_bytes, file_field
        self.upload = Upload(path=dest)
        self.too_large = False
        self.error: str | None = None
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._sink: IO[bytes] | None = None
        self._field: bytearray | None = None
        self.saw_file = False

    def callbacks(self) -> dict:
        return {"on_part_begin": self.part_begin, "on_header_field": self.header_field,
                "on_header_value": self.header_value, "on_header_end": self.header_end,
                "on_headers_finished": self.headers_finished, "on_part_data": self.part_data,
                "on_part_end": self.part_end}

    def part_begin(self) -> None:
        self._headers, self._name, self._field = {}, None, None

    def header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name, self._header_value = b"", b""

    def headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = params.get(b"name", b"").decode("utf-8", "replace")
        if self._name == self.file_field:
            if self.saw_file:
                self.error = f"more than one '{self.file_field}' part"
                return
            self.saw_file = True
            self.upload.filename = params.get(b"filename", b"").decode("utf-8", "replace")
            self._sink = open(self.dest, "wb")  # noqa: SIM115 - closed in part_end / close()
        else:
            self._field = bytearray()

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self.too_large or self.error:
            return
        chunk = data[start:end]
        if self._sink is not None:
            self.upload.size += len(chunk)
            if self.upload.size > self.max_bytes:
                self.too_large = True
                self.close()
                return
            self._sink.write(chunk)
        elif self._field is not None:
            self._field += chunk
            if len(self._field) > FIELD_LIMIT:
                self.error = f"form field '{self._name}' is over {FIELD_LIMIT} bytes"

    def part_end(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        elif self._field is not None and self._name:
            self.upload.fields[self._name] = self._field.decode("utf-8", "replace")
            self._field = None

    def close(self) -> None:
        if self._sink is not None:
            self._sink.close()
            self._sink = None


async def _drain(stream: AsyncIterator[bytes], budget: int) -> None:
    """Read and drop the rest of a refused body (bounded), so the client sees our response
    instead of a connection reset while it is still sending."""
    try:
        async for chunk in stream:
            budget -= len(chunk)
            if budget < 0:
                return
    except ClientDisconnect:
        return


def too_large(max_bytes: int) -> UploadTooLarge:
    return UploadTooLarge(f"the upload is larger than the limit of {max_bytes} bytes "
                          "(SLIMLINE_MAX_UPLOAD_BYTES)")


async def receive_upload(request: Request, dest: Path, max_bytes: int,
                         file_field: str = "file") -> Upload:
    """Parse a multipart/form-data body; the `file_field` part goes to `dest`, other parts become
    `Upload.fields`. UploadTooLarge (413) as soon as the file exceeds `max_bytes`."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise UnsupportedMediaType(f"send multipart/form-data with a '{file_field}' part, got "
                                   f"{request.headers.get('content-type') or 'no content type'}")
    length = request.headers.get("content-length")
    stream = request.stream()
    if length and length.isdigit() and int(length) > max_bytes + OVERHEAD:
        if int(length) <= max_bytes + DRAIN_LIMIT:
            await _drain(stream, DRAIN_LIMIT + max_bytes)
        raise too_large(max_bytes)
    collector = _PartCollector(dest, max_bytes, file_field)
    parser = MultipartParser(boundary, collector.callbacks())
    try:
        async for chunk in stream:
            parser.write(chunk)
            if collector.too_large:
                await _drain(stream, DRAIN_LIMIT)
                raise too_large(max_bytes)
            if collector.error:
                raise BadRequest(f"malformed upload: {collector.error}")
        parser.finalize()
    except ClientDisconnect as exc:
        raise BadRequest("the client disconnected before the upload finished") from exc
    except (BadRequest, UploadTooLarge):
        raise
    except Exception as exc:  # python-multipart raises on malformed bodies
        raise BadRequest(f"malformed multipart body: {exc}") from exc
    finally:
        collector.close()
    if not collector.saw_file:
        raise BadRequest(f"the form has no '{file_field}' part; send the file as "
                         f"-F {file_field}=@path")
    return collector.upload
