"""Folding the header lines the daemon adds at the top of a message (X-Antivirus and the
spam headers): one helper for both, so every added line stays below HEADER_WIDTH
however many threats or rules it names.
"""

HEADER_WIDTH = 78


def fold(pieces, column, newline, gap=" "):
    """The pieces (texts without line breaks) joined by gap, the first after a space,
    for a header line whose text so far ends at column; a piece that would pass
    HEADER_WIDTH starts a continuation line (newline + tab) instead. newline: str."""
    out = ""
    for k, piece in enumerate(pieces):
        before = " " if k == 0 else gap
        if column + len(before) + len(piece) > HEADER_WIDTH:
            out += newline + "\t" + piece
            column = 1 + len(piece)
        else:
            out += before + piece
            column += len(before) + len(piece)
    return out


def listed(items):
    """items as the pieces of a comma-separated list: each but the last with its comma."""
    return [item + ("," if k + 1 < len(items) else "") for k, item in enumerate(items)]
