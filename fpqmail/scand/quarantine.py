"""The quarantine store: originals of messages, zstandard-compressed, with what is
known about them and what became of them.

Layout of a store directory (the same for --quarantine and --backup):

    DIR/YYYYMMDD/xx/<unixtime>.<random>.eml.zst   the original message, one zstd frame
    DIR/YYYYMMDD/xx/<unixtime>.<random>.json      envelope, verdict, fate, engines, time
    DIR/tmp/                                     files being written

The entry's ID is "YYYYMMDD/xx/<unixtime>.<random>" (UTC date; xx = the first two hex
digits of the random part). A day holds 256 directories, so a million entries a day
make about 4000 files per directory, and listing one day never reads another.

Every file is written under a temporary name in DIR/tmp, fsynced, then renamed into
place; the .json goes last, so an entry exists exactly when its .json does. Files are
mode 0600, directories 0700. The .eml.zst opens with the standard `zstd -d`.

Whoever can write in a store can forge entries that `fpqmail-quarantine release` sends
on, or plant symlinks that the daemon would write through. So the store is walked one
directory at a time from DIR, each opened relative to the one above with O_NOFOLLOW
and checked on its descriptor: a directory, not writable by group or others, and (for
the daemon) owned by the daemon's user or root. Anything else is refused, never
adopted; no symlink inside a store is ever followed.
"""

import contextlib
import datetime
import errno
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
TEMP = "tmp"
CHUNK = 1 << 20
LEVEL = 3  # zstd's default: fast, and mail compresses well at it

# What fp-qmail does with the message, as far as the daemon knows: the verdict, the
# policy and the request's On-Virus say it (fate_of, handler.py). Deferred: refused for
# now (the spam engine down, rspamd's soft reject; a backup keeps those). Entries stored
# before fates were recorded: unknown.
FATES = ("delivered", "rejected", "dropped", "deferred", "unknown")

# The .json's fields and their types; an entry missing one, or with one of another
# type, is damaged: refused with a line that says so, never half shown or released.
_TEXT_FIELDS = ("id", "kind", "time", "status", "sender", "sha256", "scan_id")
_LIST_FIELDS = ("threats", "engines", "recipients", "released")

_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted under an entry's name must not hang the reader.
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class StoreError(Exception):
    """An entry cannot be stored or read; the message says which and why."""


class Missing(StoreError):
    """A directory of the store does not exist."""


def fate_of(status, on_virus) -> str:
    """What fp-qmail does with a message of this verdict under its On-Virus policy
    (docs/protocol.md; None when the request did not say)."""
    if status == "clean":
        return "delivered"
    if on_virus == "drop":
        return "dropped"
    if on_virus == "reject" or (on_virus == "deliver" and status == "infected"):
        return "rejected"  # an infected message that cannot be cleaned is never delivered
    if on_virus == "deliver":
        return "delivered"  # the cleaned copy
    return "unknown"


class Store:
    """A store directory. The daemon (the default) accepts only directories owned by
    its own user or root; fpqmail-quarantine, run by root on the daemon's store, passes
    any_owner=True. Either way no directory may be a symlink or writable by others."""

    def __init__(self, root, any_owner=False):
        self.root = root
        self.temp_path = os.path.join(root, TEMP)
        self._owners = None if any_owner else frozenset({0, os.geteuid()})

    def create(self):
        """Make the store's directories (0700) where absent and check them; check that
        zstandard can be imported. Raises StoreError naming what is wrong."""
        _zstandard()
        with self._directory(create=True), self.temp_directory(create=True):
            pass
        return self

    def check(self):
        """The store exists and passes the checks, or StoreError."""
        with self._directory():
            pass
        return self

    def temp_directory(self, create=False):
        """A context manager: the checked descriptor of DIR/tmp."""
        return self._directory(TEMP, create=create)

    # ---- writing ------------------------------------------------------------------

    def put(self, message, envelope: Envelope, *, kind, status, fate, threats, engines, scan_id="",
            now=None) -> str:
        """Store message (bytes-like) with its metadata; return the new entry's ID.
        fate: what becomes of the message (FATES; fate_of() tells it)."""
        zstandard = _zstandard()
        now = time.time() if now is None else now
        random = secrets.token_hex(8)
        day = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
        name = f"{int(now)}.{random}"
        entry_id = f"{day:%Y%m%d}/{random[:2]}/{name}"
        meta = {
            "id": entry_id,
            "kind": kind,
            "time": _iso(day),
            "status": status,
            "fate": fate,
            "threats": list(threats),
            "engines": list(engines),
            "sender": _text(envelope.sender),
            "recipients": [_text(r) for r in envelope.recipients],
            "size": len(message),
            "sha256": hashlib.sha256(message).hexdigest(),
            "scan_id": scan_id,
            "released": [],
        }
        cctx = zstandard.ZstdCompressor(level=LEVEL, write_checksum=True, write_content_size=True)

        def write_message(f):
            with cctx.stream_writer(f, size=len(message), closefd=False) as z, memoryview(message) as view:
                for start in range(0, len(view), CHUNK):
                    z.write(view[start:start + CHUNK])

        with self._directory(f"{day:%Y%m%d}", random[:2], create=True) as directory, \
                self.temp_directory(create=True) as tmp:
            _write_atomically(tmp, directory, name + MESSAGE, write_message)
            try:
                _write_atomically(tmp, directory, name + META, _json_writer(meta))
            except BaseException:
                _unlink_quietly(name + MESSAGE, directory)  # no message without its .json
                raise
            os.fsync(directory)
        return entry_id

    def mark_released(self, entry_id, when=None):
        meta = self.meta(entry_id)
        meta["released"].append(_iso(datetime.datetime.fromtimestamp(
            time.time() if when is None else when, datetime.timezone.utc)))
        day, prefix, name = _parts(entry_id)
        try:
            with self._directory(day, prefix) as directory, self.temp_directory() as tmp:
                _write_atomically(tmp, directory, name + META, _json_writer(meta))
                os.fsync(directory)
        except OSError as e:
            raise StoreError(f"{entry_id}: cannot record the release: {e.strerror}") from None

    def delete(self, entry_id):
        day, prefix, name = _parts(entry_id)
        try:
            with self._directory(day, prefix) as directory:
                os.unlink(name + META, dir_fd=directory)  # first: the entry is gone at once
                _unlink_quietly(name + MESSAGE, directory)
        except (Missing, FileNotFoundError):
            raise StoreError(f"{entry_id}: no such entry") from None
        except OSError as e:
            raise StoreError(f"{entry_id}: cannot delete: {e.strerror}") from None

    # ---- reading ------------------------------------------------------------------

    def ids(self, skipped=None):
        """Every entry's ID, oldest day first, by time within a day. A directory that
        cannot be read or fails the checks is given to skipped(StoreError) and passed
        over, or, without skipped, raised."""
        with self._directory() as root:
            days = _subdirectories(root, _DAY)
        for day in days:
            names = []
            try:
                with self._directory(day) as directory:
                    prefixes = _subdirectories(directory, _PREFIX)
            except (OSError, StoreError) as e:
                _skip(skipped, e, os.path.join(self.root, day))
                continue
            for prefix in prefixes:
                try:
                    with self._directory(day, prefix) as directory, os.scandir(directory) as it:
                        for e in it:
                            m = _ENTRY.match(e.name)
                            if m:
                                names.append((_sort_key(m.group(1)), f"{day}/{prefix}/{m.group(1)}"))
                except (OSError, StoreError) as e:
                    _skip(skipped, e, os.path.join(self.root, day, prefix))
            yield from (entry_id for _, entry_id in sorted(names))

    def meta(self, entry_id) -> dict:
        """The entry's metadata, checked: every field there, of its type."""
        data = self._read(entry_id, META, "metadata")
        try:
            meta = json.loads(data)
        except (ValueError, RecursionError) as e:
            raise StoreError(f"{entry_id}: damaged metadata: {e}") from None
        return _checked_meta(entry_id, meta)

    def original(self, entry_id) -> bytes:
        """The stored message, checked against the SHA-256 recorded with it."""
        zstandard = _zstandard()
        meta = self.meta(entry_id)
        try:
            data = zstandard.ZstdDecompressor().decompressobj().decompress(
                self._read(entry_id, MESSAGE, "message"))
        except zstandard.ZstdError as e:
            raise StoreError(f"{entry_id}: unreadable message: {e}") from None
        if hashlib.sha256(data).hexdigest() != meta["sha256"]:
            raise StoreError(f"{entry_id}: the stored message does not match its SHA-256")
        return data

    def message_path(self, entry_id):
        day, prefix, name = _parts(entry_id)
        return os.path.join(self.root, day, prefix, name + MESSAGE)

    def _read(self, entry_id, suffix, what) -> bytes:
        day, prefix, name = _parts(entry_id)
        try:
            with self._directory(day, prefix) as directory:
                fd = os.open(name + suffix, _READ, dir_fd=directory)
            with os.fdopen(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise StoreError(f"{entry_id}: damaged: its {what} is not a regular file")
                os.set_blocking(f.fileno(), True)
                return f.read()
        except (Missing, FileNotFoundError):
            raise StoreError(f"{entry_id}: no such entry" if what == "metadata"
                             else f"{entry_id}: its {what} is missing") from None
        except OSError as e:
            raise StoreError(f"{entry_id}: unreadable {what}: {e.strerror}") from None

    @contextlib.contextmanager
    def _directory(self, *names, create=False):
        """The descriptor of DIR/names..., each level opened relative to the one above
        (O_NOFOLLOW) and checked; with create, missing levels are made (0700)."""
        fd = _open_directory(self.root, None, self.root, create, self._owners)
        path = self.root
        for name in names:
            path = os.path.join(path, name)
            try:
                child = _open_directory(name, fd, path, create, self._owners)
            finally:
                os.close(fd)
            fd = child
        try:
            yield fd
        finally:
            os.close(fd)


def envelope_of(meta) -> Envelope:
    """The original envelope of an entry, byte for byte."""
    return Envelope(_bytes(meta["sender"]), tuple(_bytes(r) for r in meta["recipients"]))


def _open_directory(name, parent_fd, path, create, owners):
    if create:
        try:
            os.mkdir(name, 0o700, dir_fd=parent_fd)
        except FileExistsError:
            pass  # checked below like any other; two writers racing here both succeed
        except OSError as e:
            raise StoreError(f"{path}: cannot create: {e.strerror}") from None
        else:
            if parent_fd is not None:
                os.fsync(parent_fd)  # the new directory's name survives a crash
    try:
        fd = os.open(name, _DIRECTORY, dir_fd=parent_fd)
    except FileNotFoundError:
        raise Missing(f"{path}: no such directory") from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise StoreError(f"{path}: a symlink or not a directory: refused") from None
        raise StoreError(f"{path}: cannot open: {e.strerror}") from None
    st = os.fstat(fd)
    problem = ""
    if owners is not None and st.st_uid not in owners:
        problem = f"belongs to uid {st.st_uid}, not to this daemon's user (uid {os.geteuid()}) or root"
    elif st.st_mode & 0o022:
        problem = f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    if problem:
        os.close(fd)
        raise StoreError(f"{path}: {problem}: refused")
    return fd


def _write_atomically(tmp_fd, directory_fd, name, write):
    """Write a new file in tmp/ and rename it to name in the directory. A file root
    writes (fpqmail-quarantine) is given to the directory's owner, so that the
    daemon's user can still read and rewrite it."""
    temp = f"{os.getpid()}.{secrets.token_hex(8)}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                 dir_fd=tmp_fd)
    try:
        with os.fdopen(fd, "wb") as f:
            owner = os.fstat(directory_fd)
            if os.geteuid() == 0 and owner.st_uid != 0:
                os.fchown(f.fileno(), owner.st_uid, owner.st_gid)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.rename(temp, name, src_dir_fd=tmp_fd, dst_dir_fd=directory_fd)
    except BaseException:
        _unlink_quietly(temp, tmp_fd)
        raise


def _json_writer(meta):
    data = (json.dumps(meta, indent=1, ensure_ascii=True) + "\n").encode("ascii")
    return lambda f: f.write(data)


def _checked_meta(entry_id, meta):
    if not isinstance(meta, dict):
        raise StoreError(f"{entry_id}: damaged metadata: not a JSON object")
    missing = [key for key in _TEXT_FIELDS + _LIST_FIELDS + ("size",) if key not in meta]
    if missing:
        raise StoreError(f"{entry_id}: damaged metadata: no {', '.join(missing)}")
    meta.setdefault("fate", "unknown")
    wrong = [key for key in _TEXT_FIELDS + ("fate",) if not isinstance(meta[key], str)]
    wrong += [key for key in _LIST_FIELDS
              if not isinstance(meta[key], list) or not all(isinstance(v, str) for v in meta[key])]
    if type(meta["size"]) is not int or meta["size"] < 0:
        wrong.append("size")
    if not wrong:
        try:
            envelope_of(meta)
        except UnicodeEncodeError:  # a lone surrogate that no byte was escaped into
            wrong.append("sender or recipients")
    if wrong:
        raise StoreError(f"{entry_id}: damaged metadata: {', '.join(wrong)} not of the right type")
    return meta


def _parts(entry_id):
    m = ID.match(entry_id)
    if not m:
        raise StoreError(f"{entry_id!r}: not an entry ID (YYYYMMDD/xx/<time>.<random>)")
    return m.groups()


def _subdirectories(fd, pattern):
    with os.scandir(fd) as it:
        return sorted(e.name for e in it if pattern.match(e.name) and e.is_dir(follow_symlinks=False))


def _skip(skipped, error, path):
    if not isinstance(error, StoreError):
        error = StoreError(f"{path}: cannot read: {error.strerror}")
    if skipped is None:
        raise error
    skipped(error)


def _zstandard():
    """The zstandard module, or a StoreError that names what to install."""
    try:
        import zstandard  # only a daemon that keeps messages, and the tool, need it
    except ImportError as e:
        raise StoreError(f"the Python module zstandard cannot be imported ({e}): "
                         "install python3-zstandard") from None
    return zstandard


def _text(address: bytes) -> str:
    # surrogateescape keeps any byte; json writes the escapes as \udcXX, and _bytes
    # turns them back into the very bytes qmail handed over.
    return address.decode("utf-8", "surrogateescape")


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _iso(when):
    return when.isoformat(timespec="seconds").replace("+00:00", "Z")


def _sort_key(name):
    unixtime, random = name.split(".")
    return int(unixtime), random


def _unlink_quietly(name, dir_fd):
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass
