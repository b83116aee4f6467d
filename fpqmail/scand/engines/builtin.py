"""The builtin engine: needs nothing installed.

It knows three kinds of threat: the EICAR test string, SHA-256 digests of known-bad
files (FP_SCAND_SHA256_FILE), and banned attachment file names (FP_SCAND_BANNED_NAMES).
It looks inside zip archives, within limits against zip bombs. It does not decode MIME:
examine() hands it every decoded part.
"""

import fnmatch
import hashlib
import io
import re

from . import Engine, EngineError
from ..deadline import check as check_deadline
from ..settings import number, words

# The 68-byte EICAR anti-virus test string. Found anywhere in an object (a mail body
# rarely holds it alone); ClamAV calls its signature Eicar-Test-Signature, F-PROT said
# EICAR_Test_File.
EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
EICAR_NAME = "EICAR-Test-File"
DIGEST_NAME = "Known-Bad-SHA256"
# An archive past a limit is reported as a threat: an administrator expects a zip bomb
# (or an archive too big to look into) to be taken out, not waved through as clean and
# not retried forever as a temporary error.
LIMIT_NAME = "Zip-Limit-Exceeded"
ZIP_MAGIC = b"PK\x03\x04"
# A regular expression searches every bytes-like object (a memoryview of the message,
# an mmap) in place; bytes.find would need a copy of a memoryview first.
_EICAR = re.compile(re.escape(EICAR))
RATIO_FLOOR = 1 << 20  # the ratio limit applies to members at least this big
_DIGEST_LINE = re.compile(r"([0-9a-fA-F]{64})(?:\s+\*?(\S+))?")


class _LimitExceeded(Exception):
    pass


class BuiltinEngine(Engine):
    name = "builtin"

    def __init__(self, settings):
        self._digest_file = settings.get("FP_SCAND_SHA256_FILE", "").strip()
        self._banned = [p.lower() for p in words(settings, "FP_SCAND_BANNED_NAMES")]
        self._max_depth = number(settings, "FP_SCAND_ZIP_MAX_DEPTH", 0, 1000, int, default=5)
        self._max_files = number(settings, "FP_SCAND_ZIP_MAX_FILES", 0, 1 << 30, int, default=1000)
        self._max_size = number(settings, "FP_SCAND_ZIP_MAX_SIZE", 0, 1 << 40, int, default=100 << 20)
        self._max_ratio = number(settings, "FP_SCAND_ZIP_MAX_RATIO", 1, 1 << 30, int, default=100)
        self._digests = self._read_digests()

    def reload(self):
        self._digests = self._read_digests()

    def scan_objects(self, objects, deadline=None):
        return [self._scan_one(obj.data, obj.filename, deadline) for obj in objects]

    def _scan_one(self, data, filename, deadline):
        check_deadline(deadline)
        found = []
        if filename:
            found += self._banned_name(filename)
        budget = _Budget(self._max_files, self._max_size)
        try:
            found += self._scan_object(data, 0, budget, deadline)
        except _LimitExceeded:
            found.append(LIMIT_NAME)
        return list(dict.fromkeys(found))

    def _scan_object(self, data, depth, budget, deadline):
        found = []
        if _EICAR.search(data):
            found.append(EICAR_NAME)
        if self._digests:
            name = self._digests.get(hashlib.sha256(data).hexdigest())
            if name:
                found.append(name)
        if bytes(data[:4]) == ZIP_MAGIC:
            found += self._scan_zip(data, depth + 1, budget, deadline)
        return found

    def _scan_zip(self, data, depth, budget, deadline):
        import zipfile
        import zlib
        if depth > self._max_depth:
            raise _LimitExceeded
        found = []
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                for info in archive.infolist():
                    check_deadline(deadline)
                    if info.is_dir():
                        continue
                    found += self._banned_name(info.filename.rsplit("/", 1)[-1])
                    if info.flag_bits & 1:
                        continue  # encrypted: its name is all we can judge
                    budget.take_file()
                    if (info.file_size >= RATIO_FLOOR
                            and info.file_size > self._max_ratio * max(info.compress_size, 1)):
                        raise _LimitExceeded
                    with archive.open(info) as member:
                        content = member.read(budget.size_left + 1)
                    budget.take_bytes(len(content))
                    found += self._scan_object(content, depth, budget, deadline)
        except (zipfile.BadZipFile, zlib.error, NotImplementedError, EOFError, ValueError):
            # Not a zip we can read (corrupt, unsupported compression): its bytes were
            # scanned as they are, and what we found in readable members stands.
            pass
        return found

    def _banned_name(self, filename):
        lowered = filename.lower()
        for pattern in self._banned:
            if fnmatch.fnmatchcase(lowered, pattern):
                return [f"Banned-File-Name({pattern})"]
        return []

    def _read_digests(self):
        """The digest file: one `<sha256 hex> [name]` per line (sha256sum's output works),
        # comments and blank lines ignored. The name, if any, becomes the threat name."""
        if not self._digest_file:
            return {}
        try:
            with open(self._digest_file, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except OSError as e:
            raise EngineError(f"builtin: cannot read FP_SCAND_SHA256_FILE {self._digest_file}: {e.strerror}") from None
        digests = {}
        for number_, line in enumerate(lines, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            match = _DIGEST_LINE.fullmatch(line)
            if not match:
                raise EngineError(f"builtin: {self._digest_file}:{number_}: not a SHA-256 digest line")
            name = match.group(2) or DIGEST_NAME
            digests[match.group(1).lower()] = "".join(c if 32 < ord(c) < 127 else "?" for c in name)
        return digests


class _Budget:
    """What one scan may still unpack, shared across nested archives."""

    def __init__(self, files, size):
        self.files_left = files
        self.size_left = size

    def take_file(self):
        self.files_left -= 1
        if self.files_left < 0:
            raise _LimitExceeded

    def take_bytes(self, n):
        self.size_left -= n
        if self.size_left < 0:
            raise _LimitExceeded
