"""A store at an fsspec URL (s3://, gs://, ...) as a path object: what the writer needs of a folder, on an object store.

`store_root(out)` gives a pathlib.Path for a local folder (or file:// URL) and a `RemotePath` otherwise; the writer
uses both through the same few methods (`/`, exists, is_file, iterdir, read_bytes, unlink, rglob, ...), and differs
only where an object store has no equivalent of a folder's tools:

- No rename. A local file is written to a temp name, fsynced and renamed, so no reader ever sees half of it. An
  object store gives the same guarantee without it: one PUT makes the whole object visible at once or not at all
  (S3 and GCS: atomic, strongly consistent read-after-write), and a PUT cut by kill -9 leaves nothing. So every
  file is one PUT of its final bytes (`write_bytes`); s3fs sends a file over 100 MiB as a multipart upload, which
  also appears only when completed (a cut one leaves invisible parts for the bucket's lifecycle rule). The commit
  markers stay the same files in the same order: a part's progress.json is rewritten (one PUT) only after its
  shard PUTs returned, the manifest last; nothing else is rewritten once committed.
- No O_EXCL. Locks are created with a conditional PUT that fails if the object exists (fsspec's
  `pipe_file(mode="create")`: `If-None-Match: *` on S3, tested against moto's S3 server), so two processes can never
  both hold one. Filesystems without a conditional write fall back to fsspec's check-then-write, which is not
  atomic: there, start one writer per part. A lock names its owner (pid@host): one left by a killed process on this
  host is replaced by the next run, as on a local folder; one from another host cannot be proven dead from here
  (a lease would need clocks and conditional overwrites), so the error names the lock's URL to delete.
- No hangs. Every S3 request has a connect and a read timeout and a bounded number of tries (DSKD_PIPE_REMOTE_TIMEOUT,
  DSKD_PIPE_REMOTE_TRIES); any failure of a remote filesystem (an endpoint that is closed or never answers, no
  credentials, access denied) is one StoreError naming the URL, the endpoint and what to check (`Bounded`).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path, PurePosixPath
from types import SimpleNamespace

from dskd_pipe.cache.format import StoreError

# Every request to an object store is bounded: an endpoint that accepts connections and never answers fails after
# about TRIES x TIMEOUT seconds (plus botocore's backoff) with one line naming the URL, instead of hanging (s3fs's
# defaults, 5 tries of botocore's 5 attempts of up to 15 s each, held cache-info over 150 s). The read timeout is per
# read of the socket, not per object: a large shard still streams.
TIMEOUT_ENV = "DSKD_PIPE_REMOTE_TIMEOUT"  # seconds a request may wait for the next bytes (default 20)
TRIES_ENV = "DSKD_PIPE_REMOTE_TRIES"  # tries of a request before it fails (default 3)
_OBJECT_STORES = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


def remote_limits() -> tuple[float, int]:
    """(timeout in seconds, tries) of every object-store request: the environment's, else 20 s and 3 tries."""
    try:
        timeout = float(os.environ.get(TIMEOUT_ENV) or 20)
        tries = int(os.environ.get(TRIES_ENV) or 3)
    except ValueError:
        raise StoreError(f"{TIMEOUT_ENV}={os.environ.get(TIMEOUT_ENV)!r} / {TRIES_ENV}={os.environ.get(TRIES_ENV)!r}: "
                         "expected seconds and a count, e.g. 20 and 3.") from None
    if not (timeout > 0 and tries >= 1):
        raise StoreError(f"{TIMEOUT_ENV} must be > 0 and {TRIES_ENV} >= 1, found {timeout:g} and {tries}.")
    return timeout, tries


def _options(protocol: str) -> dict:
    """The storage options that bound each request of `protocol`'s filesystem."""
    timeout, tries = remote_limits()
    if protocol in ("s3", "s3a"):
        # botocore's standard retries are the bound; s3fs's own retry loops are set to one try in `filesystem`
        # (they nest: with 3 tries of 1 s each, one read took 8 s)
        return {"config_kwargs": {"connect_timeout": timeout, "read_timeout": timeout,
                                  "retries": {"max_attempts": tries, "mode": "standard"}}}
    return {}


def filesystem(url: str):
    """(fsspec filesystem, path inside it) of a URL. A remote one has bounded requests, and any failure of it other
    than a missing file is a StoreError naming the URL and what to check; a missing protocol package or a URL without
    a bucket is a StoreError naming the fix."""
    import fsspec

    url = str(url)
    protocol, _, rest = url.partition("://") if "://" in url else ("file", "", url)
    if protocol in _OBJECT_STORES and not rest.strip("/"):
        raise StoreError(f"{url}: no bucket in the URL. Pass {protocol}://BUCKET/PATH/TO/STORE.")
    try:
        fs, path = fsspec.core.url_to_fs(url, **_options(protocol))
    except ImportError as e:  # e.g. "Install s3fs to access S3"
        raise StoreError(f"{url}: {e}. For s3:// install s3fs, for gs:// gcsfs (pip install 'dskd-pipe[s3]').") \
            from None
    except (ValueError, TypeError) as e:  # an unknown protocol, a malformed URL
        raise StoreError(f"{url}: not a usable store URL ({' '.join(str(e).split())[:200]}).") from None
    if not is_url(url):
        return fs, path
    if protocol in ("s3", "s3a"):
        fs.retries = 1
        _no_expect_continue(fs)
    return Bounded(fs, url), path


def _no_expect_continue(fs) -> None:
    """Send S3 uploads without `Expect: 100-continue`: aiohttp waits for the 100 answer with no timeout at all, so
    an endpoint that never answers hung a PUT for ever, whatever the read timeout (measured here)."""
    if getattr(fs, "_dskd_no_expect", False):
        return
    from botocore.handlers import add_expect_header

    make_client = fs.set_session

    async def set_session(*args, **kwargs):
        client = await make_client(*args, **kwargs)
        client.meta.events.unregister("before-call.s3", add_expect_header)
        return client

    fs.set_session = set_session
    fs._dskd_no_expect = True


def _endpoint(fs) -> str:
    client = getattr(fs, "client_kwargs", None) or {}
    return client.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3") \
        or ""


def remote_error(url: str, e: BaseException, fs=None) -> StoreError:
    """One line for a failed object-store request: the URL, the endpoint, what failed and what to check."""
    name = type(e).__name__
    text = " ".join(str(e).split())[:200]
    timeout, tries = remote_limits()
    endpoint = _endpoint(fs) if fs is not None else ""
    at = f" (endpoint {endpoint})" if endpoint else ""
    if "Credentials" in name or "credentials" in text.lower():
        hint = ("no credentials: set AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (for gs://, "
                "GOOGLE_APPLICATION_CREDENTIALS)")
    elif "Timeout" in name or "timed out" in text.lower() or isinstance(e, TimeoutError):
        hint = (f"no answer within {timeout:g} s, {tries} tries: check the endpoint (AWS_ENDPOINT_URL) and the "
                f"network; {TIMEOUT_ENV} / {TRIES_ENV} raise the limits")
    elif "Connect" in name or isinstance(e, ConnectionError):
        hint = "cannot connect: check the endpoint (AWS_ENDPOINT_URL) and the network"
    elif isinstance(e, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        hint = "access denied: check that these credentials may read (and write) that bucket"
    else:
        hint = "check the URL, the endpoint (AWS_ENDPOINT_URL) and the credentials"
    return StoreError(f"{url}{at}: the object store failed ({name}: {text}); {hint}.")


# The slowest upload a write waits for: a socket that stops taking bytes has no timeout in aiohttp (a 10 MB PUT to an
# endpoint that never read hung for good), so each upload is bounded in all, by fsspec's own call timeout.
UPLOAD_FLOOR_BYTES_PER_S = 512 * 1024


def _upload_bound(values) -> float:
    """Seconds an upload of `values` (bytes, or a {path: bytes} dict) may take in all, every try included."""
    value = values[0] if values else b""
    n = sum(map(len, value.values())) if isinstance(value, dict) else len(value or b"")
    timeout, tries = remote_limits()
    return tries * (timeout + 2.0 + n / UPLOAD_FLOOR_BYTES_PER_S)


class Bounded:
    """An fsspec filesystem whose failures, other than a file that is missing or already there (which callers
    expect), are one StoreError naming the store's URL (remote_error)."""

    _PASS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, StoreError)

    def __init__(self, fs, url: str):
        self._fs, self._url = fs, url

    def __reduce__(self):
        return Bounded, (self._fs, self._url)

    def __getattr__(self, name):
        attr = getattr(self._fs, name)
        if name.startswith("_") or not callable(attr):
            return attr

        @functools.wraps(attr)
        def call(*args, **kwargs):
            if name in ("pipe_file", "pipe") and getattr(self._fs, "async_impl", False):
                kwargs.setdefault("timeout", _upload_bound(args[1:2] or [kwargs.get("value", b"")]))
            try:
                result = attr(*args, **kwargs)
            except self._PASS:
                raise
            except Exception as e:
                raise remote_error(self._url, e, self._fs) from None
            if isinstance(result, list):  # cat_ranges(on_error="return"): failures come back as values
                for item in result:
                    if isinstance(item, Exception) and not isinstance(item, self._PASS):
                        raise remote_error(self._url, item, self._fs)
            return result

        return call


def is_url(path_or_url: str) -> bool:
    return "://" in str(path_or_url) and not str(path_or_url).startswith("file://")


def store_root(path_or_url: str):
    """A local folder as a Path (file:// URLs included), any other URL as a RemotePath."""
    s = str(path_or_url)
    if s.startswith("file://"):
        return Path(s[len("file://"):])
    if is_url(s):
        fs, path = filesystem(s)
        return RemotePath(fs, path.rstrip("/"), s.rstrip("/"))
    return Path(s)


class RemotePath:
    """One object (or prefix) of an fsspec filesystem, with the pathlib methods the store writer uses.

    Folders do not exist on object stores: mkdir does nothing, a prefix "exists" when an object is under it.
    Listings are never served from fsspec's cache: other processes write the same store.
    """

    def __init__(self, fs, path: str, url: str, size: int | None = None):
        self.fs, self.path, self.url = fs, path, url
        self._size = size  # known from a listing (rglob)

    def __truediv__(self, rel) -> "RemotePath":
        rel = str(rel).strip("/")
        return RemotePath(self.fs, f"{self.path}/{rel}", f"{self.url}/{rel}")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __lt__(self, other: "RemotePath") -> bool:  # sorted() of listings, as of Paths
        return self.path < other.path

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def parent(self) -> "RemotePath":
        return RemotePath(self.fs, self.path.rsplit("/", 1)[0], self.url.rsplit("/", 1)[0])

    def _fresh(self) -> None:
        self.fs.invalidate_cache()

    def exists(self) -> bool:
        self._fresh()
        return bool(self.fs.exists(self.path))

    def is_file(self) -> bool:
        if self._size is not None:  # listed as an object
            return True
        self._fresh()
        return bool(self.fs.isfile(self.path))

    def is_dir(self) -> bool:
        self._fresh()
        return bool(self.fs.isdir(self.path))

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        """Nothing to make on an object store (the bucket must exist)."""

    def iterdir(self):
        self._fresh()
        try:
            names = self.fs.ls(self.path, detail=False)
        except FileNotFoundError:
            return iter(())
        return iter(self / n.rstrip("/").rsplit("/", 1)[-1] for n in names)

    def read_bytes(self) -> bytes:
        return self.fs.cat_file(self.path)  # FileNotFoundError when missing, as a Path

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """One PUT: the object appears whole or not at all."""
        self.fs.pipe_file(self.path, bytes(data))

    def create_exclusive(self, data: bytes) -> bool:
        """PUT only if no object is there (conditional write); False if one is."""
        try:
            self.fs.pipe_file(self.path, bytes(data), mode="create")
        except FileExistsError:
            return False
        return True

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.rm_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rglob(self, pattern: str = "*"):
        """Every object under this prefix (pattern "*" only), each with its size."""
        if pattern != "*":
            raise ValueError("RemotePath.rglob supports '*' only")
        self._fresh()
        found = self.fs.find(self.path, detail=True)
        return iter(RemotePath(self.fs, p, f"{self.url}/{p[len(self.path):].lstrip('/')}", int(info.get("size", 0)))
                    for p, info in sorted(found.items()))

    def relative_to(self, other: "RemotePath") -> PurePosixPath:
        return PurePosixPath(self.path[len(other.path):].lstrip("/"))

    def stat(self):
        size = self._size if self._size is not None else int(self.fs.size(self.path))
        return SimpleNamespace(st_size=size)
