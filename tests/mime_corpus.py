"""A MIME corpus built in code, with the ground truth the tests check against.

Builders return a Built: the bytes, and where the infected parts sit. A part is
"infected" when the test put a threat into it; its span is the byte range examine()
must replace (a body part between two delimiter lines, or the message/rfc822 part that
wraps an infected single-part message). A threat at the top level cannot be separated.
Everything else must come out byte for byte.
"""

import base64
import binascii
import io
import os
import zipfile
from dataclasses import dataclass, field

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
CRLF, LF = b"\r\n", b"\n"


@dataclass
class Built:
    data: bytes
    spans: list = field(default_factory=list)   # [(start, end)] of infected separable parts
    infected_self: bool = False                 # the threat is in this entity's own body

    @property
    def expected_status(self):
        if self.infected_self:
            return "infected"
        return "cleaned" if self.spans else "clean"


def leaf(body, nl=CRLF, ctype="text/plain; charset=us-ascii", encoding="7bit", filename=None,
         infected=None, extra=()):
    """A body part; body is encoded as `encoding` says. infected: override the guess
    (the test's EICAR anywhere in body)."""
    headers = [b"Content-Type: " + ctype.encode()]
    if encoding != "7bit" or filename:
        headers.append(b"Content-Transfer-Encoding: " + encoding.encode())
    if filename:
        headers.append(b'Content-Disposition: attachment; filename="' + filename.encode() + b'"')
    headers += list(extra)
    encoded = encode(body, encoding, nl)
    if infected is None:
        infected = carries_threat(body)
    return Built(nl.join(headers) + nl + nl + encoded, [], infected)


def encode(body, encoding, nl):
    if encoding == "base64":
        lines = base64.encodebytes(body).splitlines()
        return nl.join(lines) + (nl if lines else b"")
    if encoding == "quoted-printable":
        # b2a_qp breaks lines with LF; a CR of a CRLF it would keep as a byte of its own
        return binascii.b2a_qp(body.replace(b"\r\n", b"\n")).replace(b"\n", nl)
    return body


def multipart(parts, nl=CRLF, subtype="mixed", boundary="=_fpq_boundary_1", preamble=b"",
              epilogue=b"", close=True, extra=(), padding=b"", params=b""):
    head = [b'Content-Type: multipart/' + subtype.encode() + b'; boundary="' + boundary.encode() + b'"' + params]
    head += list(extra)
    out = nl.join(head) + nl + nl
    if preamble:
        out += preamble + nl
    spans = []
    delimiter = b"--" + boundary.encode()
    for k, part in enumerate(parts):
        out += delimiter + padding + nl
        start = len(out)
        out += part.data
        spans += [(start + s, start + e) for s, e in part.spans]
        if part.infected_self:
            spans.append((start, start + len(part.data)))
        if close or k + 1 < len(parts):  # without a close delimiter the last part runs to the end
            out += nl
    if close:
        out += delimiter + b"--" + padding + nl + epilogue
    return Built(out, spans, False)


def rfc822(inner, nl=CRLF, encoding="7bit"):
    """A message/rfc822 part holding the message `inner` (a Built from message()). In
    base64 or quoted-printable, a threat anywhere inside makes the whole part go: its
    inside cannot be rewritten byte for byte."""
    head = b"Content-Type: message/rfc822" + nl + b"Content-Disposition: attachment" + nl
    if encoding != "7bit":
        head += b"Content-Transfer-Encoding: " + encoding.encode() + nl
    head += nl
    if encoding in ("base64", "quoted-printable"):
        return Built(head + encode(inner.data, encoding, nl), [], bool(inner.spans or inner.infected_self))
    return Built(head + inner.data, [(len(head) + s, len(head) + e) for s, e in inner.spans],
                 inner.infected_self)


def message(entity, nl=CRLF, subject=b"test", extra=()):
    """A whole message: qmail-like top headers, then the entity's headers and body."""
    head = [b"Received: (qmail 4242 invoked by uid 1000); 25 Nov 2026 10:00:00 -0000",
            b"From: Alice <alice@example.org>", b"To: bob@example.net",
            b"Subject: " + subject, b"Date: Wed, 25 Nov 2026 10:00:00 +0000",
            b"Message-ID: <corpus@example.org>", b"MIME-Version: 1.0", *extra]
    top = nl.join(head) + nl
    return Built(top + entity.data, [(len(top) + s, len(top) + e) for s, e in entity.spans],
                 entity.infected_self)


def carries_threat(data):
    """Whether data holds EICAR, as it is or inside a (nested) zip."""
    if EICAR in data:
        return True
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return any(carries_threat(archive.read(name)) for name in archive.namelist())
    except (zipfile.BadZipFile, NotImplementedError):  # (a compression zipfile cannot read)
        return False


def zip_of(members):
    """A deflated zip of {name: bytes}."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return out.getvalue()


def text_and_attachment(attachment, nl=CRLF, filename="report.pdf"):
    return message(multipart([
        leaf(b"Hello Bob," + nl + b"see the attachment." + nl, nl),
        leaf(attachment, nl, "application/octet-stream", "base64", filename),
    ], nl), nl)


def corpus():
    """{name: Built}: the cases every examine test runs over."""
    cases = {}
    for tag, nl in (("crlf", CRLF), ("lf", LF)):
        cases[f"plain-{tag}"] = message(leaf(b"Just text." + nl + b"Bye." + nl, nl), nl)
        cases[f"attachment-clean-{tag}"] = text_and_attachment(b"%PDF-1.4 harmless" * 50, nl)
        cases[f"attachment-eicar-{tag}"] = text_and_attachment(EICAR, nl, "eicar.com")
        cases[f"zip-eicar-{tag}"] = text_and_attachment(
            zip_of({"readme.txt": b"nothing here", "eicar.com": EICAR}), nl, "invoice.zip")
        cases[f"single-eicar-{tag}"] = message(leaf(b"look: " + EICAR + nl, nl), nl)
    nl = CRLF
    cases["nested-alternative"] = message(multipart([
        multipart([leaf(b"plain version" + nl, nl), leaf(b"<p>html version</p>" + nl, nl, "text/html")],
                  nl, "alternative", "=_fpq_alt"),
        leaf(zip_of({"a/b/c.com": EICAR}), nl, "application/zip", "base64", "nested.zip"),
        leaf(b"trailing clean part" + nl, nl),
    ], nl, preamble=b"This is a multi-part message in MIME format.", epilogue=b"bye" + nl), nl)
    cases["infected-inside-alternative"] = message(multipart([
        multipart([leaf(b"plain" + nl, nl), leaf(EICAR, nl, "application/octet-stream", "base64", "x.bin")],
                  nl, "alternative", "=_fpq_alt2"),
        leaf(b"clean sibling" + nl, nl),
    ], nl), nl)
    forwarded = message(multipart([
        leaf(b"inner text" + nl, nl),
        leaf(EICAR, nl, "application/octet-stream", "base64", "inner.com"),
    ], nl, boundary="=_fpq_inner"), nl, b"inner")
    cases["rfc822-multipart"] = message(multipart([leaf(b"forwarding" + nl, nl), rfc822(forwarded, nl)], nl), nl)
    cases["rfc822-single"] = message(multipart([
        leaf(b"forwarding" + nl, nl),
        rfc822(message(leaf(b"inner body " + EICAR + nl, nl), nl, b"inner"), nl),
        leaf(b"after" + nl, nl),
    ], nl), nl)
    cases["digest"] = message(multipart([
        message(leaf(b"digest entry one" + nl, nl), nl, b"one"),
        message(leaf(EICAR + nl, nl), nl, b"two"),
    ], nl, "digest"), nl)
    cases["quoted-printable"] = message(multipart([
        leaf(b"caf\xe9 " + EICAR + b"  " + nl, nl, "text/plain; charset=iso-8859-1", "quoted-printable"),
        leaf(b"clean" + nl, nl),
    ], nl), nl)
    cases["eight-bit"] = message(multipart([
        leaf(b"Gr\xfc\xdfe, \xe9t\xe9 \xff\x80 raw 8-bit" + nl, nl, "text/plain; charset=iso-8859-1", "8bit"),
        leaf(EICAR, nl, "application/octet-stream", "base64", "eicar.com"),
    ], nl), nl)
    cases["two-infected"] = message(multipart([
        leaf(EICAR, nl, "application/octet-stream", "base64", "one.com"),
        leaf(b"middle" + nl, nl),
        leaf(zip_of({"two.com": EICAR}), nl, "application/zip", "base64", "two.zip"),
    ], nl), nl)
    cases["encoded-filenames"] = message(multipart([
        leaf(b"names" + nl, nl),
        leaf(EICAR, nl, "application/octet-stream", "base64", None,
             extra=[b"Content-Disposition: attachment; filename*=UTF-8''r%C3%A9sum%C3%A9.com"]),
        leaf(EICAR, nl, "application/octet-stream; name=\"=?UTF-8?B?w6l0w6kuY29t?=\"", "base64"),
    ], nl), nl)
    cases["mixed-line-endings"] = message(multipart([
        leaf(b"lf body\nline two\n", LF),
        leaf(EICAR, LF, "application/octet-stream", "base64", "lf.com"),
    ], LF), CRLF)
    cases["folded-8bit-headers"] = message(leaf(b"body" + nl, nl), nl,
                                          b"a very long subject that is" + nl + b"\tfolded \xe4\xf6\xfc", )
    cases["headers-only"] = Built(b"Received: x" + nl + b"Subject: no body" + nl)
    cases["empty"] = Built(b"")
    # Broken MIME
    unclosed = multipart([leaf(b"first" + nl, nl), leaf(EICAR, nl, "application/octet-stream", "base64", "u.com")],
                         nl, close=False)
    cases["unclosed-multipart"] = message(unclosed, nl)
    no_boundary = Built(b"Content-Type: multipart/mixed" + nl + nl + b"--x" + nl + nl + EICAR + nl + b"--x--" + nl,
                        [], True)
    cases["multipart-without-boundary"] = message(no_boundary, nl)
    threat_in_header = message(multipart([leaf(b"clean" + nl, nl), leaf(b"clean too" + nl, nl)], nl), nl,
                               b"subject " + EICAR)
    cases["eicar-in-header"] = Built(threat_in_header.data, [], True)
    preamble = message(multipart([leaf(b"clean" + nl, nl)], nl, preamble=EICAR), nl)
    cases["eicar-in-preamble"] = Built(preamble.data, [], True)
    cases["part-without-headers"] = message(multipart([
        leaf(b"first" + nl, nl), Built(nl + b"no header at all " + EICAR + nl, [], True)], nl), nl)
    cases["garbage-header-line"] = message(multipart([
        Built(b"Content-Type: text/plain" + nl + b"this is not a header" + nl + EICAR + nl, [], True),
        leaf(b"fine" + nl, nl)], nl), nl)
    sloppy = base64.b64encode(EICAR).rstrip(b"=")
    cases["sloppy-base64"] = message(multipart([
        leaf(b"text" + nl, nl),
        Built(b"Content-Type: application/octet-stream" + nl + b"Content-Transfer-Encoding: BASE64" + nl
              + b"Content-Disposition: attachment;" + nl + b"\tfilename=sloppy.com" + nl + nl
              + sloppy[:30] + b" !" + nl + sloppy[30:] + nl, [], True)], nl), nl)
    cases["transport-padding"] = message(multipart([
        leaf(b"padded" + nl, nl), leaf(EICAR, nl, "application/octet-stream", "base64", "pad.com")],
        nl, padding=b" \t "), nl)
    cases["boundary-prefix-line"] = message(multipart([
        leaf(b"--=_fpq_boundary_1X is not a delimiter" + nl + b"--=_fpq_boundary_1 either, here" + nl, nl),
        leaf(EICAR, nl, "application/octet-stream", "base64", "real.com")], nl), nl)
    return cases


def split_header(output):
    """(the X-Antivirus header examine() added, the rest) of an output message."""
    assert output.startswith(b"X-Antivirus: scanned by fp-qmail (")
    pos = 0
    while True:
        nl = output.index(b"\n", pos)
        pos = nl + 1
        if output[pos:pos + 1] not in (b" ", b"\t"):
            return output[:pos], output[pos:]


def check_output(output, built, status):
    """The output is the added header, then the original with exactly the infected
    spans replaced by text/plain notices; every other byte identical. Returns the
    notices (bytes)."""
    import email
    header, rest = split_header(output)
    original = built.data
    newline = CRLF if (original.find(b"\n") > 0 and original[original.find(b"\n") - 1:original.find(b"\n")] == b"\r") else LF
    assert all(line.endswith(newline) for line in header.splitlines(keepends=True)), header
    assert all(32 <= c < 127 or c in b"\r\n\t" for c in header), header
    if status != "cleaned":
        assert rest == original, "the original must follow the header byte for byte"
        return []
    notices = []
    spans = sorted(built.spans)
    pos_o = pos_r = 0
    for k, (start, end) in enumerate(spans):
        kept = original[pos_o:start]
        assert rest[pos_r:pos_r + len(kept)] == kept, f"bytes before infected part {k} changed"
        pos_r += len(kept)
        following = original[end:spans[k + 1][0] if k + 1 < len(spans) else len(original)]
        if k + 1 < len(spans):
            j = rest.find(following, pos_r)
        else:
            assert rest.endswith(following), "bytes after the last infected part changed"
            j = len(rest) - len(following)
        assert j >= pos_r
        notices.append(rest[pos_r:j])
        pos_r, pos_o = j, end
    assert rest[pos_r:] == original[pos_o:]
    for notice in notices:
        part = email.message_from_bytes(notice)
        assert part.get_content_type() == "text/plain"
        assert b"removed" in part.get_payload(decode=True)
    return notices


# ---- hostile shapes (issue 9 section 1) -------------------------------------------------------

QMAIL_TOP = (b"Received: (qmail 4242 invoked by uid 1000); 25 Nov 2026 10:00:00 -0000\n"
             b"From: mallory@example.org\nTo: bob@example.net\nSubject: hostile\nMIME-Version: 1.0\n")


def many_eicar_parts(count):
    """A multipart/mixed of `count` base64 attachments, each holding EICAR."""
    encoded = base64.b64encode(EICAR)
    body = b"".join(b"--b\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n"
                    b"Content-Disposition: attachment; filename=\"e%d.com\"\n\n%s\n" % (k, encoded)
                    for k in range(count))
    return QMAIL_TOP + b"Content-Type: multipart/mixed; boundary=b\n\n" + body + b"--b--\n"


def hostile_shapes():
    """{name: message} of the shapes that stalled the scanner, at the issue's sizes."""
    return {
        "10000 EICAR parts": many_eicar_parts(10000),
        "boundary of 120 KB of ;": QMAIL_TOP + b'Content-Type: multipart/mixed; boundary="' + b";" * 120_000
        + b'"\n\n--x\n\nhello\n',
        "header folded over 64000 lines": QMAIL_TOP + b"X-Folded: start\n"
        + b"".join(b" line %05d of one long folded header field\n" % k for k in range(64000)) + b"\nbody\n",
        "300000 continuation lines": QMAIL_TOP + b"X-Cont: a\n" + b" x\n" * 300_000 + b"\nbody\n",
        "100 MB single line": b"x" * (100 << 20),
        "101 MB base64 part": QMAIL_TOP + b"Content-Type: application/octet-stream\n"
        b"Content-Transfer-Encoding: base64\n\n" + base64.encodebytes(bytes(75 << 20) + EICAR + bytes(600_000)),
    }


# ---- a real-world-like corpus ----------------------------------------------------------------

def realistic(seed):
    """A message shaped like real mail, drawn from seed: multipart/signed, alternative,
    related, digest, forwarded messages in every transfer encoding, messages whose header
    is only Content-Type, CRLF or LF, unclosed multiparts, padded delimiters, lines that
    begin like a delimiter. About a third carry EICAR somewhere (often in a later part)."""
    import random
    rng = random.Random(seed)
    nl = rng.choice([CRLF, LF])
    counter = iter(range(1000))

    def boundary():
        return rng.choice(["----=_Part_%d_%d", "=_%d.%d", "Apple-Mail=_%d-%d", "b%d%d"]) % (
            next(counter), rng.randrange(10 ** 6))

    def text(infected):
        body = rng.choice([b"Hello,", b"--not a delimiter, just dashes", b"Gr\xfc\xdfe \xe9t\xe9"]) + nl
        body += b"Best regards" + nl
        return body + (EICAR + nl if infected else b"")

    def attachment(infected):
        payload = os.urandom(rng.randrange(10, 3000))
        if infected:
            payload += EICAR
        if rng.random() < 0.3:
            return leaf(zip_of({"invoice.exe": payload}), nl, "application/zip", "base64", "invoice.zip")
        name = rng.choice(["report.pdf", "photo.jpg", "r\u00e9sum\u00e9.doc", None])
        return leaf(payload, nl, "application/octet-stream", "base64", name)

    def entity(depth, infected):
        kinds = ["text", "attachment"] + (["signed", "alternative", "related", "mixed", "digest", "forward"]
                                          if depth < 3 else [])
        kind = rng.choice(kinds)
        if kind == "text":
            encoding = rng.choice(["7bit", "8bit", "quoted-printable", "base64"])
            return leaf(text(infected), nl, "text/plain; charset=iso-8859-1", encoding)
        if kind == "attachment":
            return attachment(infected)
        if kind == "forward":
            inner = message(entity(depth + 1, infected), nl, b"forwarded")
            return rfc822(inner, nl, rng.choice(["7bit", "8bit", "binary", "base64", "quoted-printable"]))
        count = rng.randrange(2, 4)
        where = rng.randrange(count) if infected else -1
        if kind == "signed":
            # the signed content, then the signature: a threat in a later part too
            where = rng.choice([0, 1]) if infected else -1
            parts = [entity(depth + 1, where == 0),
                     leaf(b"-----BEGIN PGP SIGNATURE-----" + nl + (EICAR + nl if where == 1 else b"")
                          + b"-----END PGP SIGNATURE-----" + nl, nl, "application/pgp-signature")]
            return multipart(parts, nl, "signed", boundary(),
                             params=b'; protocol="application/pgp-signature"; micalg=pgp-sha256')
        if kind == "alternative":
            parts = [leaf(text(where == 0), nl), leaf(b"<p>" + text(where == 1) + b"</p>" + nl, nl, "text/html")]
        elif kind == "related":
            parts = [leaf(b"<img src=cid:x>" + nl, nl, "text/html")] + [
                leaf(os.urandom(200) + (EICAR if where == k else b""), nl, "image/png", "base64")
                for k in range(1, count)]
        elif kind == "digest":
            parts = [message(leaf(text(where == k), nl), nl, b"digest entry") for k in range(count)]
        else:
            parts = [entity(depth + 1, where == k) for k in range(count)]
        return multipart(parts, nl, kind, boundary(),
                         preamble=rng.choice([b"", b"This is a multi-part message in MIME format."]),
                         epilogue=rng.choice([b"", b"epilogue" + nl]),
                         padding=rng.choice([b"", b"", b" \t"]),
                         close=depth > 0 or rng.random() < 0.8)

    infected = rng.random() < 0.35
    top = entity(0, infected)
    if top.data.startswith(b"Content-Type: multipart/") and rng.random() < 0.4:
        return top  # a message whose header is only Content-Type
    return message(top, nl)
