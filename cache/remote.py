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
"""
from __future__ import annotations

from pathlib import Path, PurePosixPath
from types import SimpleNamespace

from dskd_pipe.cache.format import StoreError


def filesystem(url: str):
    """(fsspec filesystem, path inside it) of a URL; a missing protocol package is a StoreError naming it."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as e:  # e.g. "Install s3fs to access S3"
        raise StoreError(f"{url}: {e}. For s3:// install s3fs, for gs:// gcsfs (pip install 'dskd-pipe[s3]').") \
            from None


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
