"""Issue 9 section 1 against a real daemon process: what hostile MIME may cost.

Each shape that stalled the scanner is sent to a real fpqmail-scand (builtin engine) and
its daemon CPU is read from /proc: at most 1 s per MB of message, with the default
limits (most shapes are refused at once) and with the limits raised out of the way (the
work itself is linear). Memory: 8 messages of 20 MB at once stay under 400 MB of peak
RSS, and the daemon goes back to its baseline. A request past its time limit stops
costing CPU. The figures go to the reliability summary (marker `load`).
"""
import base64
import os
import threading
import time

import pytest

import mime_corpus as mc
from scand_fixtures import ask, spool

RAISED = {"FP_SCAND_MAX_SIZE": str(200 << 20), "FP_SCAND_MAX_PARTS": "1000000",
          "FP_SCAND_MAX_HEADER_SIZE": str(1 << 30), "FP_SCAND_MAX_HEADER_LINES": "10000000"}
# What each shape comes out as: (with the default limits, with them raised).
EXPECTED = {
    "10000 EICAR parts": ("REFUSED", "CLEANED"),
    "boundary of 120 KB of ;": ("CLEAN", "CLEAN"),
    "header folded over 64000 lines": ("REFUSED", "CLEAN"),
    "300000 continuation lines": ("REFUSED", "CLEAN"),
    "100 MB single line": ("REFUSED", "CLEAN"),
    "101 MB base64 part": ("REFUSED", "INFECTED"),
}
CPU_PER_MB = 1.0  # seconds of daemon CPU per MB of message: the bound


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def memory_kb(pid, key):
    """VmRSS, VmHWM (the peak since clear_refs), ... of the process, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def reset_peak(pid):
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def scan(daemon, message):
    fi, fo = spool(daemon.tmpdir, message)
    try:
        return ask(daemon.port, fi, fo)
    finally:
        os.unlink(fi)
        os.unlink(fo)


@pytest.fixture(scope="module")
def shapes():
    return mc.hostile_shapes()


@pytest.mark.load
@pytest.mark.parametrize("limits", ["default", "raised"])
def test_each_hostile_shape_costs_at_most_a_second_of_cpu_per_mb(request, start_scand, tmp_path, shapes, limits):
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    daemon = start_scand(spool_dir, config=RAISED if limits == "raised" else {})
    pid = daemon.process.pid
    scan(daemon, b"Subject: warm up\n\nhello\n")
    figures = {}
    for name, message in shapes.items():
        reset_peak(pid)
        before = cpu_seconds(pid)
        status, headers = scan(daemon, message)
        spent = cpu_seconds(pid) - before
        mb = len(message) / 1e6
        expected = EXPECTED[name][limits == "raised"]
        assert status == expected, (name, status, headers)
        if status == "REFUSED":
            assert headers["Reason"][0].endswith(")") and "#5." in headers["Reason"][0], headers
        figures[f"{name} ({limits})"] = (f"{mb:.1f} MB {status} cpu {spent:.2f} s = {spent / mb:.3f} s/MB "
                                         f"peak rss {memory_kb(pid, 'VmHWM') // 1024} MB")
        assert spent <= CPU_PER_MB * max(mb, 1), (name, spent, mb)
    request.node.user_properties.append(("load", figures))
    for line in figures.items():
        print(*line)


def twenty_mb_message(k):
    """20 MB: a text part and a base64 attachment with EICAR at its end (cleaned)."""
    attachment = os.urandom(15 << 20) + mc.EICAR
    return (mc.QMAIL_TOP.replace(b"hostile", b"big %d" % k) + b"Content-Type: multipart/mixed; boundary=b\n\n"
            b"--b\nContent-Type: text/plain\n\nsee the attachment\n"
            b"--b\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n"
            b"Content-Disposition: attachment; filename=\"big.bin\"\n\n" + base64.encodebytes(attachment) + b"--b--\n")


@pytest.mark.load
def test_eight_simultaneous_20_mb_messages_stay_under_400_mb_and_memory_goes_back(request, start_scand, tmp_path):
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    daemon = start_scand(spool_dir)
    pid = daemon.process.pid
    for _ in range(8):  # every worker has served once: the baseline of a running daemon
        scan(daemon, b"Subject: warm up\n\nhello\n")
    baseline = memory_kb(pid, "VmRSS")
    figures = {"baseline rss": f"{baseline // 1024} MB"}
    for rnd in range(3):
        messages = [twenty_mb_message(k) for k in range(8)]
        results = [None] * 8

        def one(k):
            results[k] = scan(daemon, messages[k])[0]
        reset_peak(pid)
        threads = [threading.Thread(target=one, args=(k,)) for k in range(8)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        peak = memory_kb(pid, "VmHWM")
        after = memory_kb(pid, "VmRSS")
        assert results == ["CLEANED"] * 8
        figures[f"round {rnd}"] = (f"8 x {len(messages[0]) / 1e6:.1f} MB in {time.monotonic() - started:.1f} s, "
                                   f"peak rss {peak // 1024} MB, after {after // 1024} MB")
        assert peak < 400 * 1024, figures
        assert after < baseline + 5 * 1024, figures
    request.node.user_properties.append(("load", figures))
    for line in figures.items():
        print(*line)


@pytest.mark.load
def test_a_request_past_its_time_limit_stops_costing_cpu(request, start_scand, tmp_path):
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    daemon = start_scand(spool_dir, args=["--timeout", "1"], config=RAISED)
    pid = daemon.process.pid
    # Two million tiny parts, allowed by the raised limits: tens of seconds of parsing.
    message = mc.QMAIL_TOP + b"Content-Type: multipart/mixed; boundary=b\n\n" + b"--b\n\nx\n" * 2_000_000
    before = cpu_seconds(pid)
    started = time.monotonic()
    status, headers = scan(daemon, message)
    assert (status, headers["Reason"]) == ("ERROR", ["time limit"])
    answered = time.monotonic() - started
    daemon.wait_log("abandoned|time limit", timeout=10)
    time.sleep(0.5)
    settled = cpu_seconds(pid)
    time.sleep(2)
    after_reply = cpu_seconds(pid) - settled
    figures = {"reply after": f"{answered:.2f} s", "cpu until then": f"{settled - before:.2f} s",
               "cpu in the 2 s after": f"{after_reply:.2f} s"}
    request.node.user_properties.append(("load", figures))
    print(figures)
    assert after_reply < 0.2, figures
