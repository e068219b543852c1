"""S3 backend: a chunk store in an S3-compatible bucket (AWS S3, R2, MinIO, Garage, Ceph RGW).

`s3://BUCKET/PREFIX` with the endpoint, region and credentials from the standard AWS
environment variables (AWS_ENDPOINT_URL, AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_SESSION_TOKEN); plain-HTTP endpoints are allowed for self-hosted servers. The client is
obstore (Rust object_store): it imports in milliseconds, retries with backoff, and every
request has an explicit timeout (INCSTORE_S3_TIMEOUT, default 60 s), so a frozen server ends in
a clear error instead of a silent stall.

Write-once chunks use a conditional create (`If-None-Match: *`); uploads stream through a spool
file (memory bounded) and go multipart above 8 MiB; downloads stream and, when a connection
drops, resume with a ranged GET from the last byte received.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from typing import Any, BinaryIO, TypeVar
from xml.etree import ElementTree

import obstore
from obstore import exceptions as obx
from obstore.store import S3Store

from incstore.backend import AlreadyExists, Backend, Entry, Reader, check_name, valid_name
from incstore.errors import RemoteError

PART = 8 << 20
SPOOL = 8 << 20
RESUMES = 5
T = TypeVar("T")


def _seconds(env: str, default: float) -> float:
    try:
        return float(os.environ.get(env, default))
    except ValueError:
        return default


class S3Backend(Backend):
    """A chunk store under `s3://bucket/prefix`."""

    min_workers = 8
    verifies_reads_cheaply = False

    def __init__(self, url: str) -> None:
        self.url = url
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        if not bucket:
            raise RemoteError("no bucket in the chunk store URL", item=url)
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        timeout = _seconds("INCSTORE_S3_TIMEOUT", 60)
        self.timeout = timeout
        self.store = S3Store(
            bucket,
            prefix=prefix.strip("/") or None,
            client_options={"allow_http": True, "timeout": timedelta(seconds=timeout),
                            "connect_timeout": timedelta(seconds=min(10, timeout))},
            retry_config={"max_retries": 4, "retry_timeout": timedelta(seconds=timeout * 2),
                          "backoff": {"init_backoff": timedelta(milliseconds=100),
                                      "max_backoff": timedelta(seconds=5), "base": 2}},
        )

    def _call(self, what: str, name: str, fn: Callable[[], T]) -> T:
        """Run one request; turn the client's errors into one clear line naming the blob."""
        try:
            return fn()
        except FileNotFoundError:
            raise
        except (obx.UnauthenticatedError, obx.PermissionDeniedError) as e:
            raise RemoteError(f"{what} refused: bad or missing credentials ({_first(e)})",
                              item=self._where(name)) from e
        except obx.BaseError as e:
            if "NoSuchBucket" in str(e):
                raise RemoteError(f"bucket {self.bucket} does not exist", item=self.url) from e
            text = _first(e)
            if "error sending request" in text or "timed out" in text.lower():
                endpoint = os.environ.get("AWS_ENDPOINT_URL", "the S3 endpoint")
                text = f"cannot reach {endpoint} (unreachable or not answering): {text}"
            raise RemoteError(f"{what} failed: {text}", item=self._where(name)) from e
        except OSError as e:
            raise RemoteError(f"{what} failed: {e}", item=self._where(name)) from e

    def _where(self, name: str) -> str:
        return f"{self.url.rstrip('/')}/{name}" if name else self.url

    def _missing(self, name: str, e: FileNotFoundError) -> FileNotFoundError:
        if "NoSuchBucket" in str(e):
            raise RemoteError(f"bucket {self.bucket} does not exist", item=self.url) from e
        return e

    def read(self, name: str) -> bytes:
        try:
            return self._call("GET", name,
                              lambda: bytes(obstore.get(self.store, check_name(name)).bytes()))
        except FileNotFoundError as e:
            raise self._missing(name, e) from None

    def open(self, name: str) -> Reader:
        try:
            return _ResumingReader(self, check_name(name))
        except FileNotFoundError as e:
            raise self._missing(name, e) from None

    def write(self, name: str, data: bytes, *, durable: bool = False) -> None:
        # a PUT is durable when it returns
        try:
            self._call("PUT", name, lambda: obstore.put(self.store, check_name(name), data))
        except FileNotFoundError as e:
            raise self._missing(name, e) from None

    @contextlib.contextmanager
    def create(self, name: str) -> Iterator[BinaryIO]:
        check_name(name)
        with tempfile.SpooledTemporaryFile(max_size=SPOOL) as spool:
            yield spool  # type: ignore[misc]
            size = spool.tell()
            spool.seek(0)

            def put() -> Any:
                return obstore.put(self.store, name, spool, mode="create", chunk_size=PART,
                                   use_multipart=size > PART, max_concurrency=4)

            try:
                self._call("PUT", name, put)
            except RemoteError as e:
                if isinstance(e.__cause__, obx.AlreadyExistsError | obx.PreconditionError):
                    raise AlreadyExists(name) from None
                raise
            except FileNotFoundError as e:
                raise self._missing(name, e) from None

    def delete(self, name: str) -> None:
        # The client deletes through the batch API (POST ?delete), which minimal servers lack;
        # a plain DELETE of a presigned URL works on every S3 server.
        check_name(name)
        self._call("DELETE", name, lambda: self._plain_delete(name))

    def _plain_delete(self, name: str) -> None:
        url = obstore.sign(self.store, "DELETE", name, timedelta(minutes=5))
        for attempt in range(4):
            try:
                urllib.request.urlopen(urllib.request.Request(url, method="DELETE"),
                                       timeout=self.timeout).close()
                return
            except urllib.error.HTTPError as e:
                if e.code == 404:
                    return
                if e.code < 500 or attempt == 3:
                    raise OSError(f"HTTP {e.code} {e.reason}") from e
            except OSError:
                if attempt == 3:
                    raise
            time.sleep(0.1 * 2**attempt)

    def listdir(self, directory: str) -> list[Entry]:
        prefix = check_name(directory) if directory else None
        try:
            result = self._call("LIST", directory, lambda: obstore.list_with_delimiter(
                self.store, prefix))
            found = [(o["path"], o["size"], o["last_modified"].timestamp())
                     for o in result["objects"]]
        except FileNotFoundError as e:
            raise self._missing(directory, e) from None
        except RemoteError as e:
            # The client refuses the whole listing when one key (or common prefix) is not a
            # path it accepts, such as a key with a `..` segment that anyone who can write to
            # the bucket may plant: every save, gc, check and stats failed. List those pages
            # ourselves and leave the odd keys out below.
            if "invalid path" not in str(e) and "illegal character" not in str(e):
                raise
            found = self._call("LIST", directory, lambda: _raw_list(self, prefix))
        base = f"{prefix}/" if prefix else ""
        # a key planted with a `..` segment or odd characters is not ours: leave it out
        return [Entry(path.removeprefix(base), size, mtime) for path, size, mtime in found
                if valid_name(path) and path.startswith(base) and "/" not in path[len(base):]]

    def move(self, name: str, new_name: str) -> bool:
        check_name(name)
        check_name(new_name)
        try:
            self._call("COPY", name, lambda: obstore.copy(self.store, name, new_name,
                                                          overwrite=False))
        except FileNotFoundError:
            return False
        self.delete(name)
        return True

    def stat(self, name: str) -> Entry | None:
        try:
            meta = self._call("HEAD", name, lambda: obstore.head(self.store, check_name(name)))
        except FileNotFoundError as e:
            self._missing(name, e)
            return None
        return Entry(name, meta["size"], meta["last_modified"].timestamp())


def _first(e: BaseException) -> str:
    """The client's message, first line, without the request dump."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text[:300]


class _ResumingReader:
    """Streams a GET; after a dropped connection, continues with a ranged GET from the offset."""

    def __init__(self, backend: S3Backend, name: str) -> None:
        self.backend = backend
        self.name = name
        self.offset = 0
        self.buf = b""
        self.resumes = 0
        self.size: int | None = None
        self.stream: Iterator[Any] | None = None
        self._start()

    def _start(self) -> None:
        options: Any = {"range": {"offset": self.offset}} if self.offset else None

        def get() -> Any:
            return obstore.get(self.backend.store, self.name, options=options)

        result = self.backend._call("GET", self.name, get)
        if self.size is None:
            self.size = result.meta["size"]
        self.stream = iter(result.stream(min_chunk_size=1 << 20))

    def _next(self) -> bytes:
        assert self.stream is not None
        while True:
            try:
                return bytes(next(self.stream))
            except StopIteration:
                return b""
            except FileNotFoundError:
                raise
            except (obx.BaseError, OSError) as e:
                self.resumes += 1
                if self.resumes > RESUMES:
                    raise RemoteError(f"download failed after {RESUMES} resumes: {_first(e)}",
                                      item=self.backend._where(self.name)) from e
                self._start()

    def read(self, n: int = -1, /) -> bytes:
        while n < 0 or len(self.buf) < n:
            block = self._next()
            if not block:
                break
            self.offset += len(block)
            self.buf += block
        if n < 0:
            out, self.buf = self.buf, b""
        else:
            out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def close(self) -> None:
        self.stream = None

    def __enter__(self) -> _ResumingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# A plain ListObjectsV2 request, signed here (AWS Signature Version 4), for the one case the
# client cannot handle: a listing holding a key that is not a valid object_store path.


def _quote(text: str, safe: str = "") -> str:
    return urllib.parse.quote(text, safe="-_.~" + safe)


def _sign(method: str, url: str, query: dict[str, str], *, region: str, access_key: str,
          secret_key: str, token: str | None, now: datetime) -> dict[str, str]:
    """The headers that authenticate an empty-bodied request (SigV4, service s3)."""
    parts = urllib.parse.urlsplit(url)
    amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
    payload = hashlib.sha256(b"").hexdigest()
    headers = {"host": parts.netloc, "x-amz-content-sha256": payload, "x-amz-date": amz_date}
    if token:
        headers["x-amz-security-token"] = token
    signed = ";".join(sorted(headers))
    canonical = "\n".join([
        method, _quote(parts.path or "/", safe="/"),
        "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(query.items())),
        "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)), signed, payload])
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope,
                         hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret_key).encode()
    for part in (day, region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, "
                                f"SignedHeaders={signed}, Signature={signature}")
    return headers


def _raw_list(backend: S3Backend, directory: str | None) -> list[tuple[str, int, float]]:
    """The objects directly under `directory` as (name relative to the store, size, mtime),
    whatever their keys, from ListObjectsV2 pages fetched and signed here."""
    env = os.environ
    region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
    access_key, secret_key = env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY")
    if not access_key or not secret_key:
        raise OSError("a listing holds a key the client refuses, and listing it directly "
                      "needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    endpoint = (env.get("AWS_ENDPOINT_URL") or env.get("AWS_ENDPOINT")
                or f"https://s3.{region}.amazonaws.com").rstrip("/")
    if env.get("AWS_VIRTUAL_HOSTED_STYLE_REQUEST", "").lower() == "true":
        scheme, _, host = endpoint.partition("://")
        url = f"{scheme}://{backend.bucket}.{host}/"
    else:
        url = f"{endpoint}/{backend.bucket}"
    store_prefix = f"{backend.prefix}/" if backend.prefix else ""
    # encoding-type=url: a key may hold characters XML 1.0 cannot carry (a NUL, say);
    # keys then come percent-encoded with `+` for a space, as AWS's own SDKs decode them
    query = {"list-type": "2", "delimiter": "/", "encoding-type": "url",
             "prefix": store_prefix + (f"{directory}/" if directory else "")}
    out: list[tuple[str, int, float]] = []
    ns = "{http://s3.amazonaws.com/doc/2006-03-01/}"
    while True:
        headers = _sign("GET", url, query, region=region, access_key=access_key,
                        secret_key=secret_key, token=env.get("AWS_SESSION_TOKEN"),
                        now=datetime.now(timezone.utc))
        request = urllib.request.Request(
            url + "?" + "&".join(f"{_quote(k)}={_quote(v)}" for k, v in sorted(query.items())),
            headers={"Host" if k == "host" else k: v for k, v in headers.items()})
        with urllib.request.urlopen(request, timeout=backend.timeout) as response:
            body = response.read()
        try:
            root = ElementTree.fromstring(body)
        except ElementTree.ParseError as e:
            raise OSError(f"the listing is not well-formed XML ({e})") from None
        for obj in root.iter(f"{ns}Contents"):
            key = urllib.parse.unquote_plus(obj.findtext(f"{ns}Key") or "")
            size = obj.findtext(f"{ns}Size") or "0"
            stamp = (obj.findtext(f"{ns}LastModified") or "").replace("Z", "+00:00")
            try:
                mtime = datetime.fromisoformat(stamp).timestamp()
            except ValueError:
                mtime = 0.0
            if key.startswith(store_prefix) and size.isdigit():
                out.append((key[len(store_prefix):], int(size), mtime))
        token = root.findtext(f"{ns}NextContinuationToken")
        if root.findtext(f"{ns}IsTruncated") != "true" or not token:
            return out
        query["continuation-token"] = token
