"""Read an sh-compatible assignment file (/etc/f-prot.conf) without running a shell.

The file is meant to be sourced by the script that starts qmail, so its lines are sh:
`KEY=value`, `export KEY=value`, several assignments on one line, single quotes
(literal), double quotes (with \\" \\\\ \\$ \\` escapes), backslash escapes outside
quotes, comments and blank lines. Nothing is ever executed or expanded: a line that
needs the shell to mean something (`$VAR`, a backquote, `$(...)`, a command, an
unterminated quote) is reported and skipped, never guessed at.

The one reader of the file for fp-qmail and fpqmail-scand alike.
"""
import posix

SIZE_MAX = 1 << 20  # a settings file larger than this is refused, not read

_SPECIAL = set(" \t;&|<>()")


def read(path):
    """(values, problems) of the settings file at path. Raises FileNotFoundError when it
    does not exist, OSError when it cannot be read, ValueError when it is larger than
    SIZE_MAX. O_NONBLOCK: a FIFO planted under the name cannot hang the reader."""
    fd = posix.open(path, posix.O_RDONLY | posix.O_NONBLOCK | posix.O_CLOEXEC)
    try:
        chunks = []
        size = 0
        while size <= SIZE_MAX:
            chunk = posix.read(fd, SIZE_MAX + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        posix.close(fd)
    if size > SIZE_MAX:
        raise ValueError("larger than %d bytes" % SIZE_MAX)
    return parse(b"".join(chunks).decode("utf-8", "surrogateescape"))


def parse(text):
    """Return (values, problems): the assignments in file order (a later one wins) and,
    for every line skipped, (line number, what is wrong with it)."""
    values = {}
    problems = []
    for number, line in enumerate(text.split("\n"), 1):
        try:
            values.update(_parse_line(line))
        except ValueError as e:
            problems.append((number, str(e)))
    return values, problems


def _parse_line(line):
    pos = _skip_blanks(line, 0)
    assignments = {}
    if line.startswith("export", pos) and line[pos + 6:pos + 7] in (" ", "\t"):
        pos = _skip_blanks(line, pos + 6)
        exported = True
    else:
        exported = False
    while pos < len(line) and line[pos] != "#":
        name_end = pos
        while name_end < len(line) and (line[name_end].isalnum() or line[name_end] == "_") \
                and line[name_end].isascii():
            name_end += 1
        name = line[pos:name_end]
        if not name or name[0].isdigit():
            raise ValueError("not an assignment: %r" % line.strip())
        if name_end == len(line) or line[name_end] != "=":
            if exported:  # `export NAME` marks an existing variable: nothing to read
                pos = _skip_blanks(line, name_end)
                continue
            raise ValueError("not an assignment: %r" % line.strip())
        value, pos = _parse_word(line, name_end + 1)
        assignments[name] = value
        if pos < len(line) and line[pos] not in " \t":
            raise ValueError("unsupported shell syntax: %r" % line.strip())
        pos = _skip_blanks(line, pos)
    return assignments


def _skip_blanks(line, pos):
    while pos < len(line) and line[pos] in " \t":
        pos += 1
    return pos


def _parse_word(line, pos):
    """One sh word starting at pos: returns (its value, the position after it)."""
    out = []
    while pos < len(line):
        c = line[pos]
        if c in _SPECIAL:
            break
        if c == "'":
            end = line.find("'", pos + 1)
            if end < 0:
                raise ValueError("unterminated single quote")
            out.append(line[pos + 1:end])
            pos = end + 1
        elif c == '"':
            pos += 1
            while True:
                if pos >= len(line):
                    raise ValueError("unterminated double quote")
                c = line[pos]
                if c == '"':
                    pos += 1
                    break
                if c == "\\" and pos + 1 < len(line) and line[pos + 1] in '"\\$`':
                    out.append(line[pos + 1])
                    pos += 2
                    continue
                if c in "$`":
                    raise ValueError("expansion is not supported: %r" % line.strip())
                out.append(c)
                pos += 1
        elif c == "\\":
            if pos + 1 >= len(line):
                raise ValueError("line continuation is not supported")
            out.append(line[pos + 1])
            pos += 2
        elif c in "$`":
            raise ValueError("expansion is not supported: %r" % line.strip())
        else:
            out.append(c)
            pos += 1
    return "".join(out), pos
