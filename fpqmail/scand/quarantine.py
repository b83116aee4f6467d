"""The quarantine store: originals of messages, zstandard-compressed, with what is
known about them.

Layout of a store directory (the same for --quarantine and --backup):

    DIR/YYYYMMDD/xx/<unixtime>.<random>.eml.zst   the original message, one zstd frame
    DIR/YYYYMMDD/xx/<unixtime>.<random>.json      envelope, verdict, engines, time
    DIR/tmp/                                     files being written

The entry's ID is "YYYYMMDD/xx/<unixtime>.<random>" (UTC date; xx = the first two hex
digits of the random part). A day holds 256 directories, so a million entries a day
make about 4000 files per directory, and listing one day never reads another.

Every file is written under a temporary name in DIR/tmp, fsynced, then renamed into
place; the .json goes last, so an entry exists exactly when its .json does. Files are
mode 0600, directories 0700. The .eml.zst opens with the standard `zstd -d`.
"""

import datetime
import hashlib
import json
import os
import re
import secrets
import stat
import time

from .protocol import Envelope

ID = re.compile(r"\A(\d{8})/([0-9a-f]{2})/(\d{1,12}\.[0-9a-f]{16})\Z")
_DAY = re.compile(r"\A\d{8}\Z")
_PREFIX = re.compile(r"\A[0-9a-f]{2}\Z")
_ENTRY = re.compile(r"\A(\d{1,12}\.[0-9a-f]{16})\.json\Z")
MESSAGE = ".eml.zst"
META = ".json"
CHUNK = 1 << 20
LEVEL = 3  # zstd's default: fast, and mail compresses well at it


class StoreError(Exception):
    """An entry cannot be stored or read; the message says which and why."""


class Store:
    def __init__(self, root):
        self.root = root
        self._tmp = os.path.join(root, "tmp")

    def create(self):
        """Make the directory (0700) if needed; refuse one that is not a directory."""
        for path in (self.root, self._tmp):
            try:
                os.mkdir(path, 0o700)
            except FileExistsError:
                if not stat.S_ISDIR(os.lstat(path).st_mode):
                    raise StoreError(f"{path}: exists and is not a directory") from None
        return self

    # ---- writing ------------------------------------------------------------------

    def put(self, message, envelope: Envelope, *, kind, status, threats, engines, scan_id="",
            now=None) -> str:
        """Store message (bytes-like) with its metadata; return the new entry's ID."""
        import zstandard  # only a daemon that keeps messages needs it
        now = time.time() if now is None else now
        random = secrets.token_hex(8)
        day = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
        entry_id = f"{day:%Y%m%d}/{random[:2]}/{int(now)}.{random}"
        meta = {
            "id": entry_id,
            "kind": kind,
            "time": day.isoformat(timespec="seconds").replace("+00:00", "Z"),
            "status": status,
            "threats": list(threats),
            "engines": list(engines),
            "sender": _text(envelope.sender),
            "recipients": [_text(r) for r in envelope.recipients],
            "size": len(message),
            "sha256": hashlib.sha256(message).hexdigest(),
            "scan_id": scan_id,
            "released": [],
        }
        directory = os.path.join(self.root, day.strftime("%Y%m%d"), random[:2])
        self._makedirs(directory)
        base = os.path.join(directory, entry_id.rsplit("/", 1)[1])
        cctx = zstandard.ZstdCompressor(level=LEVEL, write_checksum=True, write_content_size=True)

        def write_message(f):
            with cctx.stream_writer(f, size=len(message), closefd=False) as z, memoryview(message) as view:
                for start in range(0, len(view), CHUNK):
                    z.write(view[start:start + CHUNK])

        self._write_atomically(base + MESSAGE, write_message)
        self._write_meta(base + META, meta)
        _fsync_directory(directory)
        return entry_id

    def mark_released(self, entry_id, when=None):
        meta = self.meta(entry_id)
        meta["released"].append(datetime.datetime.fromtimestamp(
            time.time() if when is None else when, datetime.timezone.utc)
            .isoformat(timespec="seconds").replace("+00:00", "Z"))
        self._write_meta(self._base(entry_id) + META, meta)

    def delete(self, entry_id):
        base = self._base(entry_id)
        try:
            os.unlink(base + META)  # first: the entry is gone at once
        except FileNotFoundError:
            raise StoreError(f"{entry_id}: no such entry") from None
        try:
            os.unlink(base + MESSAGE)
        except FileNotFoundError:
            pass

    def _write_meta(self, path, meta):
        data = (json.dumps(meta, indent=1, ensure_ascii=True) + "\n").encode("ascii")
        self._write_atomically(path, lambda f: f.write(data))

    def _write_atomically(self, path, write):
        tmp = os.path.join(self._tmp, f"{os.getpid()}.{secrets.token_hex(8)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, path)
        except BaseException:
            _unlink_quietly(tmp)
            raise

    def _makedirs(self, directory):
        day = os.path.dirname(directory)
        for path in (day, directory):
            try:
                os.mkdir(path, 0o700)  # two writers racing here both succeed
            except FileExistsError:
                pass

    # ---- reading ------------------------------------------------------------------

    def ids(self):
        """Every entry's ID, oldest day first, by time within a day."""
        for day in self._subdirs(self.root, _DAY):
            names = []
            for prefix in self._subdirs(os.path.join(self.root, day), _PREFIX):
                with os.scandir(os.path.join(self.root, day, prefix)) as it:
                    for e in it:
                        m = _ENTRY.match(e.name)
                        if m:
                            names.append((_sort_key(m.group(1)), f"{day}/{prefix}/{m.group(1)}"))
            yield from (entry_id for _, entry_id in sorted(names))

    def meta(self, entry_id) -> dict:
        path = self._base(entry_id) + META
        try:
            with open(path, "rb") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            raise StoreError(f"{entry_id}: no such entry") from None
        except (OSError, ValueError) as e:
            raise StoreError(f"{entry_id}: unreadable metadata: {e}") from None

    def original(self, entry_id) -> bytes:
        """The stored message, checked against the SHA-256 recorded with it."""
        import zstandard
        meta = self.meta(entry_id)
        try:
            with open(self._base(entry_id) + MESSAGE, "rb") as f:
                data = zstandard.ZstdDecompressor().stream_reader(f).read()
        except (OSError, zstandard.ZstdError) as e:
            raise StoreError(f"{entry_id}: unreadable message: {e}") from None
        if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            raise StoreError(f"{entry_id}: the stored message does not match its SHA-256")
        return data

    def message_path(self, entry_id):
        return self._base(entry_id) + MESSAGE

    def sweep_temp(self, older_than):
        """Remove files in DIR/tmp untouched for older_than seconds (a crash's leftovers)."""
        removed = 0
        limit = time.time() - older_than
        with os.scandir(self._tmp) as it:
            for e in it:
                st = e.stat(follow_symlinks=False)
                if stat.S_ISREG(st.st_mode) and max(st.st_mtime, st.st_ctime) < limit:
                    _unlink_quietly(e.path)
                    removed += 1
        return removed

    def _base(self, entry_id):
        m = ID.match(entry_id)
        if not m:
            raise StoreError(f"{entry_id!r}: not an entry ID (YYYYMMDD/xx/<time>.<random>)")
        return os.path.join(self.root, *m.groups())

    @staticmethod
    def _subdirs(path, pattern):
        try:
            with os.scandir(path) as it:
                names = [e.name for e in it if pattern.match(e.name) and e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []
        return sorted(names)


def envelope_of(meta) -> Envelope:
    """The original envelope of an entry, byte for byte."""
    return Envelope(_bytes(meta["sender"]), tuple(_bytes(r) for r in meta["recipients"]))


def _text(address: bytes) -> str:
    # surrogateescape keeps any byte; json writes the escapes as \udcXX, and _bytes
    # turns them back into the very bytes qmail handed over.
    return address.decode("utf-8", "surrogateescape")


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _sort_key(name):
    unixtime, random = name.split(".")
    return int(unixtime), random


def _fsync_directory(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
