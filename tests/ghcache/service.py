"""The GitHub Actions cache service v2 on loopback: what the real ``@actions/cache`` client talks
to, fronting the :class:`~tests.ghrunner.cache.CacheService` model, with the real service's
faults on demand.

A :class:`CacheServer` is one threaded HTTP server on 127.0.0.1 (an ephemeral port) serving:

- the twirp JSON API at ``/twirp/github.actions.results.api.v1.CacheService/<Method>``, the
  client's ``ACTIONS_RESULTS_URL``: ``CreateCacheEntry``, ``FinalizeCacheEntryUpload`` and
  ``GetCacheEntryDownloadURL``, the three methods @actions/cache 5.0.5 calls. Bodies carry the
  protobuf field names (``signed_upload_url``, ``size_bytes``...) with every field present and
  int64 as a string, as twirp's Go server writes them. Errors are twirp's ``{"code", "msg"}``
  with twirp's statuses: 409 ``already_exists`` for a taken key (the real message, as the
  client logs it: "cache entry with the same key, version, and scope already exists"), 429
  ``resource_exhausted`` with ``Retry-After``, 401 ``unauthenticated`` for an unknown token. A
  lookup that finds nothing is ``200 {"ok": false}``, which the client takes as a miss.
- the Azure blob storage behind the signed URLs, ``http://<account>.blob.core.windows.net:<port>
  /actions-cache/<blob>?sv=..&se=..&sr=b&sp=..&sig=..``, so that the client takes its real
  Azure SDK path (``@azure/storage-blob``): Put Blob (what it sends up to its 128 MiB single-shot
  limit), Put Block and Put Block List beyond that, Get Blob Properties and ranged Get Blob
  (``x-ms-range``) for downloads, with Azure's XML errors. The host name resolves to loopback
  only inside the client, through ``preload.js``. Plain http is what Azurite serves too: the
  SDK refuses http only for bearer-token credentials, and a SAS URL carries none.

Which job calls is its ``ACTIONS_RUNTIME_TOKEN``: :meth:`CacheServer.token` issues one per job,
mapped to the scopes it reads (in lookup order) and the one it writes. The client never looks
inside the token (the real one is a JWT), so these are opaque.

Faults, set from a test: :meth:`CacheServer.fail` (an HTTP error for the next N calls of a
method, or all of them, optionally only for keys matching a glob), :meth:`CacheServer.not_ok`
(``200`` with ``ok: false`` and a message), :meth:`CacheServer.pause` (a call, or an upload after
so many bytes, blocks until the test releases it: a slow finalize, a client killed mid-upload)
and :meth:`CacheServer.hold` (a reservation never finalized, as by a job cancelled mid-upload).
Every request is recorded in :attr:`CacheServer.calls` with its monotonic arrival time, so a test
counts the client's attempts and measures its backoff.
"""

from __future__ import annotations

import base64
import contextlib
import fnmatch
import hashlib
import hmac
import io
import json
import os
import secrets
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime, formatdate
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from ..ghrunner.cache import (
    CacheConflict,
    CacheEntry,
    CacheNotFinalized,
    CacheRateLimited,
    CacheService,
    Reservation,
)

SERVICE = "github.actions.results.api.v1.CacheService"
TWIRP_PREFIX = f"/twirp/{SERVICE}/"
CREATE = "CreateCacheEntry"
FINALIZE = "FinalizeCacheEntryUpload"
LOOKUP = "GetCacheEntryDownloadURL"
TWIRP_METHODS = (CREATE, FINALIZE, LOOKUP)
# the blob operations, named as in Azure's REST reference
PUT_BLOB = "PutBlob"
PUT_BLOCK = "PutBlock"
PUT_BLOCK_LIST = "PutBlockList"
GET_PROPERTIES = "GetBlobProperties"
GET_BLOB = "GetBlob"
BLOB_METHODS = (PUT_BLOB, PUT_BLOCK, PUT_BLOCK_LIST, GET_PROPERTIES, GET_BLOB)
UPLOADS = (PUT_BLOB, PUT_BLOCK, PUT_BLOCK_LIST)
BLOB_DOMAIN = ".blob.core.windows.net"
CONTAINER = "actions-cache"
SAS_VERSION = "2025-11-05"
DEFAULT_ACCOUNT = "incstoretest"
# twirp's error codes for the HTTP statuses it maps them to
TWIRP_CODES = {400: "invalid_argument", 401: "unauthenticated", 403: "permission_denied",
               404: "not_found", 408: "deadline_exceeded", 409: "already_exists",
               412: "failed_precondition", 429: "resource_exhausted", 500: "internal",
               501: "unimplemented", 503: "unavailable"}
CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Job:
    """What one runtime token grants: the scopes it reads, in lookup order, and the one it
    writes (a pull request's ``refs/pull/N/merge``; None: read-only)."""

    token: str
    read_scopes: tuple[str, ...]
    write_scope: str | None
    name: str = ""


@dataclass
class Call:
    """One request the service received."""

    method: str
    key: str | None
    status: int  # 0: the client went away before an answer
    at: float  # time.monotonic() on arrival
    job: str = ""
    fault: bool = False  # answered by an injected fault


@dataclass
class Fault:
    """An injected answer for calls of ``method`` (a twirp method or a blob operation) whose key
    matches the glob ``key`` (any key when None): the next ``times`` of them (None: all)."""

    method: str
    status: int = 500
    times: int | None = 1
    key: str | None = None
    message: str = ""
    retry_after: int | None = None
    ok_false: bool = False  # 200 with ok: false (twirp methods only)
    body: str | None = None  # a raw body instead of twirp's JSON error
    hits: int = 0

    def matches(self, method: str, key: str | None) -> bool:
        if method != self.method or (self.times is not None and self.hits >= self.times):
            return False
        return self.key is None or (key is not None and fnmatch.fnmatchcase(key, self.key))


@dataclass
class Gate:
    """Holds the first matching call (for an upload: once ``after_bytes`` of its body have
    arrived) until :meth:`release`; ``reached`` is set when it starts holding."""

    method: str
    key: str | None = None
    after_bytes: int = 0
    timeout: float = 120.0  # a gate nobody releases lets go by itself
    reached: threading.Event = field(default_factory=threading.Event)
    released: threading.Event = field(default_factory=threading.Event)
    taken: bool = False

    def matches(self, method: str, key: str | None) -> bool:
        return (not self.taken and method == self.method
                and (self.key is None or (key is not None and fnmatch.fnmatchcase(key, self.key))))

    def wait_reached(self, timeout: float = 30.0) -> bool:
        return self.reached.wait(timeout)

    def release(self) -> None:
        self.released.set()

    def hold(self) -> None:
        self.reached.set()
        self.released.wait(self.timeout)


@dataclass
class _Blob:
    """A blob name handed out in a signed URL: a reservation's upload, later its entry."""

    name: str
    key: str
    reservation: int
    entry: int | None = None
    blocks: dict[str, Path] = field(default_factory=dict)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # an idle keep-alive connection must not hold stop() up
    owner: CacheServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return  # a client killed or gone mid-request is a scenario, not a server bug
        super().handle_error(request, client_address)


class CacheServer:
    """The cache service v2 and its blob storage on 127.0.0.1, over one :class:`CacheService`.

    Use as a context manager or :meth:`start`/:meth:`stop`. :meth:`token` gives a job its
    ``ACTIONS_RUNTIME_TOKEN``; :meth:`env` the variables the runner gives a node action.
    """

    def __init__(self, cache: CacheService, *, account: str = DEFAULT_ACCOUNT) -> None:
        self.cache = cache
        self.account = account
        self.calls: list[Call] = []
        self._faults: list[Fault] = []
        self._gates: list[Gate] = []
        self._jobs: dict[str, Job] = {}
        self._blobs: dict[str, _Blob] = {}
        self._entry_blobs: dict[int, str] = {}
        self._secret = secrets.token_bytes(32)
        self._lock = threading.Lock()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> CacheServer:
        if self._httpd is not None:
            return self
        httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        httpd.owner = self
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, name="ghcache",
                                        kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        with self._lock:
            for gate in self._gates:
                gate.release()
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> CacheServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("the cache server is not running")
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        """ACTIONS_RESULTS_URL."""
        return f"http://127.0.0.1:{self.port}/"

    @property
    def blob_host(self) -> str:
        return f"{self.account}{BLOB_DOMAIN}"

    # -- jobs --------------------------------------------------------------------------------

    def token(self, read_scopes: Sequence[str], write_scope: str | None, name: str = "") -> str:
        """A new runtime token for a job reading ``read_scopes`` (in lookup order) and writing
        ``write_scope``."""
        token = f"ghcache_{secrets.token_urlsafe(24)}"
        with self._lock:
            self._jobs[token] = Job(token, tuple(dict.fromkeys(read_scopes)), write_scope, name)
        return token

    def env(self, token: str) -> dict[str, str]:
        """What the runner puts in a node action's environment for the cache client."""
        return {"ACTIONS_RESULTS_URL": self.url, "ACTIONS_RUNTIME_TOKEN": token,
                "ACTIONS_CACHE_SERVICE_V2": "True",
                "ACTIONS_CACHE_URL": "https://acghubeus1.actions.githubusercontent.com/x/"}

    def job(self, token: str) -> Job | None:
        with self._lock:
            return self._jobs.get(token)

    # -- faults and inspection ---------------------------------------------------------------

    def fail(self, method: str, status: int = 500, *, times: int | None = 1,
             key: str | None = None, message: str = "", retry_after: int | None = None,
             body: str | None = None) -> Fault:
        """Answer the next ``times`` calls (None: every call) of ``method`` whose key matches the
        glob ``key`` with HTTP ``status``."""
        self._check_method(method)
        fault = Fault(method, status, times, key, message or HTTPStatus(status).phrase,
                      retry_after, body=body)
        with self._lock:
            self._faults.append(fault)
        return fault

    def not_ok(self, method: str, message: str = "", *, times: int | None = 1,
               key: str | None = None) -> Fault:
        """Answer ``200 {"ok": false, "message": message}`` (a twirp method)."""
        if method not in TWIRP_METHODS:
            raise ValueError(f"ok: false is a twirp answer, not one of {method}")
        fault = Fault(method, 200, times, key, message, ok_false=True)
        with self._lock:
            self._faults.append(fault)
        return fault

    def pause(self, method: str, *, key: str | None = None, after_bytes: int = 0,
              timeout: float = 120.0) -> Gate:
        """Hold the next call of ``method`` (an upload: after ``after_bytes`` of its body) until
        the returned gate is released."""
        self._check_method(method)
        gate = Gate(method, key, after_bytes, timeout)
        with self._lock:
            self._gates.append(gate)
        return gate

    def hold(self, key: str, version: str, scope: str) -> Reservation:
        """A reservation that is never finalized, as a job cancelled mid-upload leaves."""
        return self.cache.reserve(key, version, scope)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()
            for gate in self._gates:
                gate.release()
            self._gates.clear()

    def attempts(self, method: str, key: str | None = None) -> list[Call]:
        """The recorded calls of a method (for one key), oldest first."""
        with self._lock:
            return [c for c in self.calls if c.method == method and key in (None, c.key)]

    @staticmethod
    def _check_method(method: str) -> None:
        if method not in TWIRP_METHODS + BLOB_METHODS:
            raise ValueError(f"unknown method {method!r}: one of {TWIRP_METHODS + BLOB_METHODS}")

    def _take_fault(self, method: str, key: str | None) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, key):
                    fault.hits += 1
                    return fault
        return None

    def _take_gate(self, method: str, key: str | None) -> Gate | None:
        with self._lock:
            for gate in self._gates:
                if gate.matches(method, key):
                    gate.taken = True
                    return gate
        return None

    def _record(self, call: Call) -> None:
        with self._lock:
            self.calls.append(call)

    # -- signed URLs -------------------------------------------------------------------------

    def _signature(self, name: str, permission: str, expiry: str) -> str:
        message = f"{permission}\n{expiry}\n/{self.account}/{CONTAINER}/{name}".encode()
        return base64.b64encode(hmac.new(self._secret, message, hashlib.sha256).digest()).decode()

    def _signed_url(self, name: str, permission: str) -> str:
        expiry = (self.cache.clock.now() + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
        sig = self._signature(name, permission, expiry)
        return (f"http://{self.blob_host}:{self.port}/{CONTAINER}/{name}?sv={SAS_VERSION}"
                f"&se={quote(expiry, safe='')}&sr=b&sp={permission}&sig={quote(sig, safe='')}")

    def _authorized(self, name: str, query: Mapping[str, list[str]], permission: str) -> bool:
        def one(field_name: str) -> str:
            return (query.get(field_name) or [""])[0]
        if permission not in one("sp") or one("sr") != "b":
            return False
        expected = self._signature(name, one("sp"), one("se"))
        return hmac.compare_digest(expected, one("sig"))

    # -- the twirp methods -------------------------------------------------------------------

    def create_cache_entry(self, job: Job, body: Mapping[str, Any]
                           ) -> tuple[int, dict[str, Any], dict[str, str]]:
        key, version = str(body.get("key") or ""), str(body.get("version") or "")
        if not key or not version:
            return _twirp_error(400, "key and version are required")
        if job.write_scope is None:
            return _twirp_error(403, "the token has no scope to write cache entries to")
        try:
            reservation = self.cache.reserve(key, version, job.write_scope)
        except CacheRateLimited as e:
            status, payload, headers = _twirp_error(429, str(e))
            return status, payload, {**headers, "Retry-After": str(e.retry_after)}
        except CacheConflict as e:
            return _twirp_error(409, str(e))
        name = uuid.uuid4().hex
        with self._lock:
            self._blobs[name] = _Blob(name, key, reservation.id)
        return 200, {"ok": True, "signed_upload_url": self._signed_url(name, "cw"),
                     "message": ""}, {}

    def finalize_cache_entry_upload(self, job: Job, body: Mapping[str, Any]
                                    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        key, version = str(body.get("key") or ""), str(body.get("version") or "")
        try:
            size = int(body.get("size_bytes") or 0)
        except (TypeError, ValueError):
            return _twirp_error(400, "size_bytes is not an integer")
        if job.write_scope is None:
            return _twirp_error(403, "the token has no scope to write cache entries to")
        reservation = next((r for r in self.cache.pending
                            if (r.key.casefold(), r.version, r.scope)
                            == (key.casefold(), version, job.write_scope)), None)
        try:
            entry = self.cache.finalize(key, version, job.write_scope, size)
        except CacheNotFinalized:
            # what the real service says here is not documented; ok: false without a message
            # is what the client has a generic message for
            return 200, {"ok": False, "entry_id": "0", "message": ""}, {}
        with self._lock:
            for blob in self._blobs.values():
                if reservation is not None and blob.reservation == reservation.id:
                    blob.entry = entry.id
                    self._entry_blobs[entry.id] = blob.name
        return 200, {"ok": True, "entry_id": str(entry.id), "message": ""}, {}

    def get_cache_entry_download_url(self, job: Job, body: Mapping[str, Any]
                                     ) -> tuple[int, dict[str, Any], dict[str, str]]:
        key, version = str(body.get("key") or ""), str(body.get("version") or "")
        restore_keys = [str(k) for k in body.get("restore_keys") or []]
        entry = self.cache.lookup(key, restore_keys, version, job.read_scopes)
        if entry is None:
            return 200, {"ok": False, "signed_download_url": "", "matched_key": ""}, {}
        name = self._blob_of(entry)
        return 200, {"ok": True, "signed_download_url": self._signed_url(name, "r"),
                     "matched_key": entry.key}, {}

    def _blob_of(self, entry: CacheEntry) -> str:
        """The blob name of an entry (one made up for entries committed without an upload)."""
        with self._lock:
            name = self._entry_blobs.get(entry.id)
            if name is None:
                name = uuid.uuid4().hex
                self._blobs[name] = _Blob(name, entry.key, 0, entry.id)
                self._entry_blobs[entry.id] = name
            return name

    def _blob(self, name: str) -> _Blob | None:
        with self._lock:
            return self._blobs.get(name)


def _twirp_error(status: int, message: str) -> tuple[int, dict[str, Any], dict[str, str]]:
    return status, {"code": TWIRP_CODES.get(status, "internal"), "msg": message}, {}


def _storage_code(status: int) -> str:
    """The x-ms-error-code Azure storage gives with a status, for an injected fault."""
    if status == 503:
        return "ServerBusy"
    if status >= 500:
        return "InternalError"
    return HTTPStatus(status).phrase.replace(" ", "")


def _http_date(when: datetime | None = None) -> str:
    return format_datetime(when, usegmt=True) if when is not None else formatdate(usegmt=True)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as both the http-client and the SDK expect
    server: _HTTPServer
    timeout = 120  # an idle keep-alive connection is dropped eventually

    def log_message(self, format: str, *args: Any) -> None:
        return None

    @property
    def owner(self) -> CacheServer:
        return self.server.owner

    def _host_is_blob(self) -> bool:
        host = (self.headers.get("Host") or "").rsplit(":", 1)[0].lower()
        return host.endswith(BLOB_DOMAIN)

    def do_POST(self) -> None:
        if self._host_is_blob() or not self.path.startswith(TWIRP_PREFIX):
            self._drain()
            self._send_json(*_twirp_error(404, f"no handler for {self.path}"))
            return
        self._twirp(self.path[len(TWIRP_PREFIX):].split("?", 1)[0])

    def do_PUT(self) -> None:
        self._blob_request("PUT")

    def do_GET(self) -> None:
        self._blob_request("GET")

    def do_HEAD(self) -> None:
        self._blob_request("HEAD")

    # -- plumbing ------------------------------------------------------------------------------

    def _send(self, status: int, body: bytes = b"", headers: Mapping[str, str] | None = None,
              content_type: str | None = None) -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, status: int, payload: Mapping[str, Any],
                   headers: Mapping[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode(), headers, "application/json")

    def _drain(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        while length > 0:
            got = self.rfile.read(min(CHUNK, length))
            if not got:
                break
            length -= len(got)

    def _read_body(self, sink: Any, gate: Gate | None) -> bool:
        """Copy the request body into ``sink`` (Content-Length or chunked), holding at the
        gate once ``after_bytes`` have arrived; False when the client went away first."""
        received = 0

        def take(data: bytes) -> None:
            nonlocal received
            if gate is not None and not gate.reached.is_set() \
                    and received + len(data) >= gate.after_bytes:
                cut = max(0, gate.after_bytes - received)
                sink.write(data[:cut])
                gate.hold()
                sink.write(data[cut:])
            else:
                sink.write(data)
            received += len(data)

        try:
            if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                while True:
                    size_line = self.rfile.readline()
                    if not size_line:
                        return False
                    size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
                    if size == 0:
                        self.rfile.readline()
                        break
                    data = self.rfile.read(size)
                    if len(data) < size:
                        return False
                    take(data)
                    self.rfile.readline()
            else:
                length = int(self.headers.get("Content-Length") or 0)
                if gate is not None and length == 0:
                    take(b"")
                while length > 0:
                    data = self.rfile.read(min(CHUNK, length))
                    if not data:
                        return False
                    take(data)
                    length -= len(data)
        except (ConnectionError, TimeoutError, ValueError):
            return False
        return True

    # -- twirp ---------------------------------------------------------------------------------

    def _twirp(self, method: str) -> None:
        owner = self.owner
        arrived = time.monotonic()
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = None
        key = str(body.get("key")) if isinstance(body, dict) and "key" in body else None
        auth = self.headers.get("Authorization") or ""
        job = owner.job(auth[len("Bearer "):]) if auth.startswith("Bearer ") else None
        job_name = job.name if job else ""

        def answer(status: int, payload: Mapping[str, Any], headers: Mapping[str, str],
                   fault: bool = False) -> None:
            owner._record(Call(method, key, status, arrived, job_name, fault))
            self._send_json(status, payload, headers)

        if method not in TWIRP_METHODS:
            answer(*_twirp_error(404, f"no handler for path {self.path}"))
            return
        if not isinstance(body, dict):
            answer(*_twirp_error(400, "the request body is not a JSON object"))
            return
        if job is None:
            answer(*_twirp_error(401, "the runtime token is missing or not valid"))
            return
        fault = owner._take_fault(method, key)
        if fault is not None:
            self._answer_fault(fault, method, key, arrived, job_name)
            return
        gate = owner._take_gate(method, key)
        if gate is not None:
            gate.hold()
        handler = {CREATE: owner.create_cache_entry, FINALIZE: owner.finalize_cache_entry_upload,
                   LOOKUP: owner.get_cache_entry_download_url}[method]
        answer(*handler(job, body))

    def _answer_fault(self, fault: Fault, method: str, key: str | None, arrived: float,
                      job_name: str) -> None:
        self.owner._record(Call(method, key, fault.status, arrived, job_name, fault=True))
        headers = {} if fault.retry_after is None else {"Retry-After": str(fault.retry_after)}
        if fault.ok_false:
            fields = {CREATE: {"signed_upload_url": ""}, FINALIZE: {"entry_id": "0"},
                      LOOKUP: {"signed_download_url": "", "matched_key": ""}}[method]
            payload: dict[str, Any] = {"ok": False, **fields}
            if method != LOOKUP:
                payload["message"] = fault.message
            self._send_json(200, payload, headers)
        elif fault.body is not None:
            self._send(fault.status, fault.body.encode(), headers, "text/plain")
        elif method in BLOB_METHODS:
            self._send_storage_error(fault.status, _storage_code(fault.status), fault.message,
                                     headers)
        else:
            status, payload, _ = _twirp_error(fault.status, fault.message)
            self._send_json(status, payload, headers)

    # -- blob storage --------------------------------------------------------------------------

    def _storage_headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"x-ms-request-id": str(uuid.uuid4()),
                   "x-ms-version": self.headers.get("x-ms-version") or SAS_VERSION,
                   "Date": _http_date()}
        client_id = self.headers.get("x-ms-client-request-id")
        if client_id:
            headers["x-ms-client-request-id"] = client_id
        headers.update(extra or {})
        return headers

    def _send_storage_error(self, status: int, code: str, message: str,
                            extra: Mapping[str, str] | None = None) -> None:
        request_id = str(uuid.uuid4())
        body = (f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{code}</Code>'
                f"<Message>{message}\nRequestId:{request_id}\nTime:"
                f"{datetime.now(timezone.utc):%Y-%m-%dT%H:%M:%S.%fZ}</Message></Error>").encode()
        headers = self._storage_headers({"x-ms-error-code": code, **(extra or {})})
        headers["x-ms-request-id"] = request_id
        self._send(status, body, headers, "application/xml")

    def _blob_request(self, verb: str) -> None:
        owner = self.owner
        arrived = time.monotonic()
        if not self._host_is_blob():
            self._drain()
            self._send_json(*_twirp_error(404, f"no handler for {self.path}"))
            return
        parts = urlsplit(self.path)
        query = parse_qs(parts.query)
        container, _, name = parts.path.lstrip("/").partition("/")
        comp = (query.get("comp") or [""])[0]
        operation = {("PUT", ""): PUT_BLOB, ("PUT", "block"): PUT_BLOCK,
                     ("PUT", "blocklist"): PUT_BLOCK_LIST, ("HEAD", ""): GET_PROPERTIES,
                     ("GET", ""): GET_BLOB}.get((verb, comp))
        blob = owner._blob(name) if container == CONTAINER else None
        key = blob.key if blob is not None else None

        def record(status: int, fault: bool = False) -> None:
            owner._record(Call(operation or f"{verb} {comp}".strip(), key, status, arrived,
                               fault=fault))

        if operation is None:
            self._drain()
            record(400)
            self._send_storage_error(400, "UnsupportedQueryParameter",
                                     f"The query parameter comp={comp} is not supported.")
            return
        permission = "w" if verb == "PUT" else "r"
        if blob is None or not owner._authorized(name, query, permission):
            self._drain()
            record(403)
            self._send_storage_error(403, "AuthenticationFailed", "Server failed to authenticate "
                                     "the request. Make sure the value of Authorization header is "
                                     "formed correctly including the signature.")
            return
        fault = owner._take_fault(operation, key)
        if fault is not None:
            self._drain()  # the connection stays usable: read the body the fault refuses
            self._answer_fault(fault, operation, key, arrived, "")
            return
        gate = owner._take_gate(operation, key)
        if operation in UPLOADS:
            self._upload(operation, blob, query, gate, record)
        else:
            if gate is not None:
                gate.hold()
            self._download(operation, blob, record)

    def _upload(self, operation: str, blob: _Blob, query: Mapping[str, list[str]],
                gate: Gate | None, record: Any) -> None:
        owner = self.owner
        reservation = owner.cache.reservation(blob.reservation)
        if reservation is None or reservation.blob is None:
            self._drain()
            record(409)
            self._send_storage_error(409, "BlobImmutable", "This blob is immutable.")
            return
        target = reservation.blob
        if operation == PUT_BLOCK:
            block_id = (query.get("blockid") or [""])[0]
            if not block_id:
                self._drain()
                record(400)
                self._send_storage_error(400, "InvalidQueryParameterValue",
                                         "Value for one of the query parameters specified in the "
                                         "request URI is invalid.")
                return
            target = target.with_name(f"{target.name}.block-"
                                      f"{hashlib.sha256(block_id.encode()).hexdigest()[:32]}")
        partial = target.with_name(f"{target.name}.part-{uuid.uuid4().hex[:8]}")
        if operation == PUT_BLOCK_LIST:
            buffer = io.BytesIO()
            complete = self._read_body(buffer, gate)
        else:
            with open(partial, "wb") as sink:
                complete = self._read_body(sink, gate)
        if not complete:
            # the client died mid-upload: nothing lands, the reservation stays as it was
            partial.unlink(missing_ok=True)
            record(0)
            self.close_connection = True
            return
        if operation == PUT_BLOCK_LIST:
            try:
                wanted = [el.text or "" for el in ET.fromstring(buffer.getvalue())]
            except ET.ParseError:
                record(400)
                self._send_storage_error(400, "InvalidXmlDocument",
                                         "XML specified is not syntactically valid.")
                return
            missing = [b for b in wanted if b not in blob.blocks]
            if missing:
                record(400)
                self._send_storage_error(400, "InvalidBlockList",
                                         "The specified block list is invalid.")
                return
            with open(partial, "wb") as sink:
                for block_id in wanted:
                    with open(blob.blocks[block_id], "rb") as part:
                        while chunk := part.read(CHUNK):
                            sink.write(chunk)
            for path in blob.blocks.values():
                path.unlink(missing_ok=True)
            blob.blocks.clear()
        if owner.cache.reservation(blob.reservation) is None:
            # finalized or released while this upload was in flight
            partial.unlink(missing_ok=True)
            record(409)
            self._send_storage_error(409, "BlobImmutable", "This blob is immutable.")
            return
        os.replace(partial, target)
        if operation == PUT_BLOCK:
            blob.blocks[(query.get("blockid") or [""])[0]] = target
        record(201)
        headers = self._storage_headers({"x-ms-request-server-encrypted": "true"})
        if operation != PUT_BLOCK:
            headers.update({"ETag": f'"0x{uuid.uuid4().hex[:15].upper()}"',
                            "Last-Modified": _http_date(owner.cache.clock.now())})
        self._send(201, b"", headers)

    def _download(self, operation: str, blob: _Blob, record: Any) -> None:
        owner = self.owner
        entry = owner.cache.entry(blob.entry) if blob.entry is not None else None
        if entry is None or not entry.blob.is_file():
            record(404)
            self._send_storage_error(404, "BlobNotFound", "The specified blob does not exist.")
            return
        size = entry.size
        headers = self._storage_headers({
            "ETag": f'"0x{entry.id:015X}"', "Last-Modified": _http_date(entry.created_at),
            "x-ms-blob-type": "BlockBlob", "x-ms-creation-time": _http_date(entry.created_at),
            "x-ms-server-encrypted": "true", "x-ms-lease-status": "unlocked",
            "x-ms-lease-state": "available", "Accept-Ranges": "bytes"})
        if operation == GET_PROPERTIES:
            record(200)
            self.send_response(200)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(size))
            self.end_headers()
            return
        start, end, status = 0, size - 1, 200
        wanted = self.headers.get("x-ms-range") or self.headers.get("Range")
        if wanted:
            try:
                unit, _, spec = wanted.partition("=")
                first, _, last = spec.partition("-")
                if unit.strip() != "bytes":
                    raise ValueError(wanted)
                start = int(first)
                end = min(int(last), size - 1) if last.strip() else size - 1
            except ValueError:
                start, end = size, size - 1
            if start >= size or start > end:
                record(416)
                self._send_storage_error(416, "InvalidRange",
                                         "The range specified is invalid for the current size of "
                                         "the resource.", {"Content-Range": f"bytes */{size}"})
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        record(status)
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        with contextlib.suppress(ConnectionError), open(entry.blob, "rb") as source:
            source.seek(start)
            remaining = end - start + 1
            while remaining > 0:
                chunk = source.read(min(CHUNK, remaining))
                if not chunk:
                    break
                self.wfile.write(chunk)
                remaining -= len(chunk)
