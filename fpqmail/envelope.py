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
    the final NUL are not part of it (a caller may keep writing on fd 1)."""
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
