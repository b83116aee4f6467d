"""qmail's envelope, as qmail-queue reads it on fd 1: F<sender>\\0, one T<recipient>\\0
per recipient, then one more \\0. The one parser of it, shared by fp-qmail (which
checks it exactly as qmail-queue does before anything is scanned) and fpqmail-scand.
Imports nothing: it is on fp-qmail's per-message path.
"""
ADDRESS_MAX = 1003  # qmail-queue's ADDR: an address must be shorter

# What check() finds wrong, in the order qmail-queue meets it while reading.
ENDED_EARLY = "ended early"
FORMAT_ERROR = "format error"
ADDRESS_TOO_LONG = "address too long"


def check(data):
    """(problem or None, length of the envelope including its final NUL). Bytes after
    the final NUL are not part of it (a caller may keep writing on fd 1).

    A whole envelope is recognised with a few passes of bytes methods (millions of
    recipients cost milliseconds); only a broken one is walked record by record, to
    name the first problem as qmail-queue meets it."""
    length = _whole_length(data)
    if length:
        return None, length
    return _first_problem(data)


def _whole_length(data):
    """The length of the envelope at the start of data if it is whole and well formed,
    else 0. The first empty record (a NUL right after a NUL) ends it; before that,
    every NUL but the sender's last must be followed by a T, and no address may reach
    ADDRESS_MAX bytes."""
    if data[:1] != b"F":
        return 0
    end = data.find(b"\0\0")
    if end < 0:
        return 0
    records = end + 1  # F<sender>\0 T<recipient>\0 ...: searched in place, never copied
    if data.count(b"\0", 0, records) != data.count(b"\0T", 0, records) + 1:
        return 0
    # No run of ADDRESS_MAX + 1 bytes without a NUL (the F or T and the address): from
    # each window's last NUL, the next window; every skipped start lies before that NUL.
    pos = 0
    while records - pos > ADDRESS_MAX:
        nul = data.rfind(b"\0", pos, pos + ADDRESS_MAX + 1)
        if nul < 0:
            return 0
        pos = nul + 1
    return end + 2


def _first_problem(data):
    if not data:
        return ENDED_EARLY, 0
    if data[0] != 0x46:  # F
        return FORMAT_ERROR, 0
    pos = 1
    while True:
        nul = data.find(b"\0", pos, pos + ADDRESS_MAX)
        if nul < 0:
            return (ADDRESS_TOO_LONG if len(data) - pos >= ADDRESS_MAX else ENDED_EARLY), 0
        pos = nul + 1
        if pos >= len(data):
            return ENDED_EARLY, 0
        if data[pos] == 0:
            return None, pos + 1
        if data[pos] != 0x54:  # T
            return FORMAT_ERROR, 0
        pos += 1


def split(raw):
    """(sender, [recipients]) of an envelope that check() found whole; ValueError else."""
    problem, length = check(raw)
    if problem or length != len(raw):
        raise ValueError("malformed envelope: %s" % (problem or "bytes after its end"))
    fields = raw[:-2].split(b"\0")
    return fields[0][1:], [f[1:] for f in fields[1:]]
