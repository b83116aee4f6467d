"""Load (issue 6, section 2): FPQMAIL_LOAD_MESSAGES messages (CI: 200; `make
reliability`: 2000), 16 at a time, each a real fp-qmail process, through a real
fpqmail-scand with a real clamd engine, to the strict stand-in.

Every message has its own queue directory, so each delivery is attributed: 0 lost
(every message that must be delivered was, exactly once), 0 duplicated, 0 files left
in tmpdir (the rig's teardown), every delivered message byte-identical to what it
must be (mime_corpus's oracle: the original after one added header, infected parts
replaced by notices and nothing else changed), every infected one refused. Figures:
latency p50/p99, messages per second, and the daemon's resident memory after warm-up
and after the run (at most 1.2x).
"""
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import mime_corpus as mc
from conftest import envelope, read_deliveries

MESSAGES = int(os.environ.get("FPQMAIL_LOAD_MESSAGES", "200"))
CONCURRENCY = 16
WARM_UP = max(MESSAGES // 10, 32)
HEADER = b"X-Antivirus: scanned by fp-qmail (clamd)"


def make_message(n):
    """Message n of the mix: mostly clean (text of every size, 8-bit, attachments),
    every tenth with an infected attachment, another tenth in a zip (both delivered
    cleaned), every tenth infected beyond cleaning (refused)."""
    rng = random.Random(n)
    nl = mc.CRLF if n % 3 else mc.LF
    kind = n % 10
    if kind == 7:
        return mc.text_and_attachment(mc.EICAR, nl, "eicar%d.com" % n)
    if kind == 8:
        return mc.text_and_attachment(mc.zip_of({"readme.txt": b"hello", "x%d.com" % n: mc.EICAR}), nl,
                                      "invoice%d.zip" % n)
    if kind == 9:
        return mc.message(mc.leaf(b"look: " + mc.EICAR + nl, nl), nl, b"infected %d" % n)
    if kind == 6:
        return mc.text_and_attachment(rng.randbytes(rng.randrange(1, 60000)), nl, "data%d.bin" % n)
    size = rng.choice([100, 2000, 20000, 200000])
    body = bytes(rng.choice(b"abcdefghij \xe9\xfc\x80" * 3 + b"\n") for _ in range(rng.randrange(1, size)))
    return mc.message(mc.leaf(body.replace(b"\n", nl), nl, "text/plain; charset=iso-8859-1", "8bit"), nl,
                      b"clean %d" % n)


def rss_kb(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for %d" % pid)


def percentile(values, p):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


@pytest.mark.load
def test_load_through_daemon_and_clamd_loses_nothing(rig, start_scand, clamd, request):
    daemon = start_scand(rig.tmpdir, engines=(clamd.unix_spec,))
    rig.env["FP_QMAIL_SCANNER"] = daemon.address
    rig.env["FP_QMAIL_LOGLEVEL"] = "3"  # the per-message info line would be 2000 stderr reads
    built = {n: make_message(n) for n in range(MESSAGES)}
    outcomes = {}

    def one(n):
        queue_dir = rig.root / ("q%d" % n)
        queue_dir.mkdir()
        started = time.monotonic()
        r = rig.run(message=built[n].data, env_bytes=envelope(b"sender%d@example.org" % n),
                    env={"QQ_STANDIN_DIR": str(queue_dir)})
        outcomes[n] = (r.code, time.monotonic() - started, read_deliveries(queue_dir), r.stderr)

    with ThreadPoolExecutor(CONCURRENCY) as pool:
        list(pool.map(one, range(WARM_UP)))
        warm_rss = rss_kb(daemon.process.pid)
        started = time.monotonic()
        list(pool.map(one, range(WARM_UP, MESSAGES)))
        elapsed = time.monotonic() - started
    after_rss = rss_kb(daemon.process.pid)

    lost, duplicated, wrong, refused = [], [], [], 0
    for n, (code, _, deliveries, stderr) in outcomes.items():
        expected = built[n].expected_status
        if expected == "infected":
            if code != 31 or deliveries:
                wrong.append((n, code, len(deliveries), stderr[-300:]))
            refused += 1
            continue
        if code != 0 or not deliveries:
            lost.append((n, code, stderr[-300:]))
            continue
        if len(deliveries) > 1:
            duplicated.append(n)
        message, env, _ = deliveries[0]
        try:
            assert message.startswith(HEADER) and env == envelope(b"sender%d@example.org" % n)
            mc.check_output(message, built[n], expected)
        except AssertionError as e:
            wrong.append((n, code, "bytes differ: %s" % e))
    latencies = [outcomes[n][1] * 1000 for n in range(WARM_UP, MESSAGES)]
    figures = {
        "messages": MESSAGES, "concurrency": CONCURRENCY,
        "delivered": sum(1 for o in outcomes.values() if o[0] == 0), "refused (infected)": refused,
        "lost": len(lost), "duplicated": len(duplicated), "wrong": len(wrong),
        "files left": len(list(rig.tmpdir.iterdir())),
        "latency p50 ms": round(percentile(latencies, 50), 1),
        "latency p99 ms": round(percentile(latencies, 99), 1),
        "messages/s": round((MESSAGES - WARM_UP) / elapsed, 1),
        "daemon RSS warm MB": round(warm_rss / 1024, 1), "daemon RSS after MB": round(after_rss / 1024, 1),
        "RSS ratio": round(after_rss / warm_rss, 3),
    }
    request.node.user_properties.append(("load", figures))
    print(figures)
    assert len(outcomes) == MESSAGES
    assert (lost, duplicated, wrong) == ([], [], []), (lost[:5], duplicated[:5], wrong[:5])
    assert figures["files left"] == 0
    assert after_rss <= 1.2 * warm_rss, figures
