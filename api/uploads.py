"""Streaming multipart uploads: the request body is parsed as it arrives and the `file` part is
written to a temporary file, so every limit holds while bytes arrive, with or without a
Content-Length (chunked bodies): the bytes read from the stream (max_upload_bytes + OVERHEAD), the
file part (max_upload_bytes), the number of parts (max_form_fields), each part's headers and each
text field (FIELD_LIMIT). Text fields and the file name must be UTF-8 without control characters
(422 naming the field). Uploads live in a `service.tmpfiles.temp_dir` under `<home>/tmp`, which the
API sweeps at start-up and periodically (`sweep_temp_loop`) for what killed processes left."""
from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request

from service.db import session_scope
from service.errors import (
    BadRequest,
    SlimlineError,
    Unprocessable,
    UnsupportedMediaType,
    UploadTooLarge,
)
from service.quotas import check_upload_quota
from service.settings import Settings
from service.tmpfiles import sweep

if TYPE_CHECKING:  # defined for type checkers only
    from python_multipart.multipart import MultipartCallbacks

log = logging.getLogger(__name__)

FIELD_LIMIT = 64 * 1024  # per non-file form field
HEADER_LIMIT = 16 * 1024  # the headers of one part
OVERHEAD = 256 * 1024  # multipart boundaries, part headers and small fields
DRAIN_LIMIT = 64 * 1024 * 1024  # read (and drop) at most this much of a refused body
SWEEP_INTERVAL_S = 300.0
# C0 controls but tab/newline/carriage return, DEL and C1 controls; `name` and the file name may
# hold none at all
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")
_ANY_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_SINGLE_LINE = {"name"}


def temp_root(settings: Settings) -> Path:
    """Where uploads are received (and swept)."""
    return settings.home / "tmp"


@dataclass
class Upload:
    path: Path
    filename: str = ""
    size: int = 0
    fields: dict[str, str] = field(default_factory=dict)


def _text(what: str, raw: bytes, single_line: bool) -> str:
    """`raw` as text, or a 422 naming `what` (not UTF-8, or control characters such as NUL)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Unprocessable(f"{what} is not valid UTF-8; send text fields as UTF-8") from None
    bad = (_ANY_CONTROL if single_line else _CONTROL).search(text)
    if bad:
        raise Unprocessable(f"{what} contains the control character U+{ord(bad.group()):04X}"
                            f"{' (NUL)' if bad.group() == chr(0) else ''}; remove it")
    return text


class _PartCollector:
    """Callbacks for python-multipart's push parser; the first refusal is kept in `failure`."""

    def __init__(self, dest: Path, max_bytes: int, file_field: str, max_parts: int) -> None:
        self.dest, self.max_bytes, self.file_field = dest, max_bytes, file_field
        self.max_parts = max_parts
        self.upload = Upload(path=dest)
        self.failure: SlimlineError | None = None
        self.parts = 0
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._header_bytes = 0
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._sink: IO[bytes] | None = None
        self._field: bytearray | None = None
        self.saw_file = False

    def callbacks(self) -> MultipartCallbacks:
        return {"on_part_begin": self.part_begin, "on_header_field": self.header_field,
                "on_header_value": self.header_value, "on_header_end": self.header_end,
                "on_headers_finished": self.headers_finished, "on_part_data": self.part_data,
                "on_part_end": self.part_end}

    def fail(self, exc: SlimlineError) -> None:
        if self.failure is None:
            self.failure = exc
        self.close()

    def part_begin(self) -> None:
        self._headers, self._name, self._field, self._header_bytes = {}, None, None, 0
        self.parts += 1
        if self.parts > self.max_parts:
            self.fail(UploadTooLarge(f"the form has more than {self.max_parts} parts "
                                     "(SLIMLINE_MAX_FORM_FIELDS); send the file and a few fields"))

    def _count_header(self, n: int) -> bool:
        self._header_bytes += n
        if self._header_bytes > HEADER_LIMIT and self.failure is None:
            self.fail(BadRequest(f"malformed upload: a part's headers are over {HEADER_LIMIT} "
                                 "bytes"))
        return self.failure is None

    def header_field(self, data: bytes, start: int, end: int) -> None:
        if self._count_header(end - start):
            self._header_name += data[start:end]

    def header_value(self, data: bytes, start: int, end: int) -> None:
        if self._count_header(end - start):
            self._header_value += data[start:end]

    def header_end(self) -> None:
        self._headers[bytes(self._header_name).lower()] = bytes(self._header_value)
        self._header_name, self._header_value = bytearray(), bytearray()

    def headers_finished(self) -> None:
        if self.failure:
            return
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        try:
            self._name = _text("a form part's name", params.get(b"name", b""), True)
            if self._name == self.file_field:
                if self.saw_file:
                    raise BadRequest(f"malformed upload: more than one '{self.file_field}' part")
                self.saw_file = True
                self.upload.filename = _text("the file name", params.get(b"filename", b""),
                                             True)
                self._sink = open(self.dest, "wb")  # noqa: SIM115 - closed in part_end / close()
            else:
                self._field = bytearray()
        except SlimlineError as exc:
            self.fail(exc)

    def part_data(self, data: bytes, start: int, end: int) -> None:
        if self.failure:
            return
        chunk = data[start:end]
        if self._sink is not None:
            self.upload.size += len(chunk)
            if self.upload.size > self.max_bytes:
                self.fail(too_large(self.max_bytes))
                return
            self._sink.write(chunk)
        elif self._field is not None:
            self._field += chunk
            if len(self._field) > FIELD_LIMIT:
                self.fail(UploadTooLarge(f"form field '{self._name}' is over {FIELD_LIMIT} "
                                         "bytes; only the file part may be large"))

    def part_end(self) -> None:
        if self.failure:
            return
        if self._sink is not None:
            self._sink.close()
            self._sink = None
        elif self._field is not None and self._name:
            try:
                self.upload.fields[self._name] = _text(
                    f"form field '{self._name}'", bytes(self._field),
                    self._name in _SINGLE_LINE)
            except SlimlineError as exc:
                self.fail(exc)
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
                         file_field: str = "file", max_parts: int = 16) -> Upload:
    """Parse a multipart/form-data body; the `file_field` part goes to `dest`, other parts become
    `Upload.fields`. UploadTooLarge (413) as soon as the file exceeds `max_bytes` or the body
    exceeds `max_bytes + OVERHEAD` (whatever Content-Length says), or past `max_parts` parts.
    On any refusal `dest` may exist half-written: the caller's temp dir removes it."""
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise UnsupportedMediaType(f"send multipart/form-data with a '{file_field}' part, got "
                                   f"{request.headers.get('content-type') or 'no content type'}")
    body_limit = max_bytes + OVERHEAD
    length = request.headers.get("content-length")
    stream = request.stream()
    if length and length.isdigit() and int(length) > body_limit:
        if int(length) <= max_bytes + DRAIN_LIMIT:
            await _drain(stream, DRAIN_LIMIT + max_bytes)
        raise too_large(max_bytes)
    collector = _PartCollector(dest, max_bytes, file_field, max_parts)
    parser = MultipartParser(boundary, collector.callbacks())
    received = 0
    try:
        async for chunk in stream:
            received += len(chunk)
            if received > body_limit:
                collector.fail(too_large(max_bytes))
            else:
                parser.write(chunk)
            if collector.failure:
                await _drain(stream, DRAIN_LIMIT)
                raise collector.failure
        parser.finalize()
    except ClientDisconnect as exc:
        raise BadRequest("the client disconnected before the upload finished") from exc
    except SlimlineError:
        raise
    except Exception as exc:  # python-multipart raises on malformed bodies
        raise BadRequest(f"malformed multipart body: {exc}") from exc
    finally:
        collector.close()
    if collector.failure:
        raise collector.failure
    if not collector.saw_file:
        raise BadRequest(f"the form has no '{file_field}' part; send the file as "
                         f"-F {file_field}=@path")
    return collector.upload


def sweep_temp(settings: Settings) -> list[Path]:
    """Remove what dead processes left under `<home>/tmp` (interrupted uploads, killed jobs)."""
    return sweep(temp_root(settings), settings.temp_max_age_s)


async def sweep_temp_once(settings: Settings) -> None:
    """One sweep off the event loop; a failure is logged, never raised."""
    try:
        await run_in_threadpool(sweep_temp, settings)
    except Exception:  # keep serving; the next round may succeed
        log.warning("temp sweep failed", exc_info=True)


async def sweep_temp_loop(settings: Settings, interval_s: float = SWEEP_INTERVAL_S) -> None:
    """Sweep every `interval_s` for the API's whole life (the start-up sweep is separate)."""
    while True:
        await asyncio.sleep(interval_s)
        await sweep_temp_once(settings)


def check_upload_admitted(settings: Settings, tenant_id: str) -> None:
    """The tenant's upload quota, in a short read of its own that ends before the body is read:
    an upload route's own session opens only for the short write at the end, so no connection
    is checked out (nor idle in transaction) while the body arrives and the inspector runs."""
    with session_scope(settings) as session:
        check_upload_quota(session, tenant_id, settings)
