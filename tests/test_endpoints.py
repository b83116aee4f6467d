"""engines/endpoints.py: the load spread over an engine's endpoints, failover within a
request, the back-off of a failing endpoint, the request's deadline, thread safety.

The peers here are small servers of the test's own on loopback (real sockets), each
naming itself in its answer; the conversation is the test's too. The same Endpoints
against three real engines, one killed mid-run: test_spam.py::test_three_rspamd_*.
"""

import socket
import threading
import time
from collections import Counter

import pytest

from fpqmail.scand.engines import EngineError
from fpqmail.scand.engines.endpoints import Endpoints


class Peer:
    """A TCP server on 127.0.0.1 that accepts and then, per `mode`: answers its name
    ("answer"), answers an error line ("error"), closes at once ("close"), or says
    nothing until it is told to stop ("silent"). It counts the connections."""

    def __init__(self, name, mode="answer", hold=None):
        self.name = name
        self.mode = mode
        self.hold = hold          # an Event "answer" waits for before answering
        self.accepted = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def _serve(self):
        while not self._stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._talk, args=(conn,), daemon=True).start()

    def _talk(self, conn):
        with conn:
            if self.mode == "close":
                return
            try:
                conn.recv(100)
                if self.mode == "silent":
                    self._stop.wait(30)
                    return
                if self.hold is not None:
                    self.hold.wait(30)
                conn.sendall(b"error\n" if self.mode == "error" else self.name.encode() + b"\n")
            except OSError:
                pass

    def close(self):
        self._stop.set()
        self.listener.close()


def talk(sock, unix):
    """The test's conversation: the peer's name, or the failures an engine's have."""
    sock.sendall(b"hello\n")
    reply = sock.recv(100)
    if not reply:
        raise ConnectionError("connection closed without a reply")
    if reply == b"error\n":
        raise EngineError("error reply")
    return reply.decode().strip()


@pytest.fixture
def peers():
    made = []

    def make(*modes, **options):
        for mode in modes:
            made.append(Peer(f"peer{len(made)}", mode, **options))
        return made[-len(modes):]
    yield make
    for peer in made:
        peer.close()


def closed_address():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def endpoints(peers_or_addresses, **options):
    spec = ",".join(p if isinstance(p, str) else p.address for p in peers_or_addresses)
    options.setdefault("connect_timeout", 2)
    options.setdefault("timeout", 5)
    return Endpoints("test", spec, **options)


def test_requests_are_spread_round_robin(peers):
    group = peers("answer", "answer", "answer")
    eps = endpoints(group)
    served = Counter(eps.ask(talk) for _ in range(30))
    assert served == {"peer0": 10, "peer1": 10, "peer2": 10}


def test_the_first_endpoint_is_drawn_at_random(peers):
    # Many daemons started at once must not all send their first request to the first
    # endpoint. 40 fresh lists all starting on one peer: chance 3 * (1/3)**40.
    group = peers("answer", "answer", "answer")
    firsts = {endpoints(group).ask(talk) for _ in range(40)}
    assert len(firsts) > 1


def test_the_least_loaded_endpoint_is_chosen(peers):
    hold = threading.Event()
    group = peers("answer", "answer", "answer", hold=hold)
    eps = endpoints(group)
    pinned = threading.Thread(target=eps.ask, args=(talk,))
    pinned.start()
    deadline = time.monotonic() + 10
    while sum(p.accepted for p in group) < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    (busy,) = [p for p in group if p.accepted]
    for peer in group:
        if peer is not busy:
            peer.hold = None
    # Round robin alone would send every third request to the busy peer (and wait).
    served = Counter(eps.ask(talk, deadline=time.monotonic() + 5) for _ in range(9))
    assert busy.name not in served and sum(served.values()) == 9
    assert busy.accepted == 1
    hold.set()
    pinned.join(10)


def test_failover_and_back_off(peers):
    dead = closed_address()
    good1, good2 = peers("answer", "answer")
    eps = endpoints([dead, good1, good2], backoff=(0.4, 1.6))
    served = Counter(eps.ask(talk) for _ in range(12))
    assert set(served) == {"peer0", "peer1"} and sum(served.values()) == 12, "every request served"
    # The dead endpoint was tried at most once, then skipped: the two others share it all.
    assert abs(served["peer0"] - served["peer1"]) <= 1


def test_a_failing_endpoint_is_retried_after_its_back_off_and_doubled(peers):
    bad, good = peers("close", "answer")
    eps = endpoints([bad, good], backoff=(0.5, 10))
    for _ in range(6):
        assert eps.ask(talk) == "peer1"
    assert bad.accepted == 1, "tried once, then skipped"
    time.sleep(0.6)
    for _ in range(6):
        assert eps.ask(talk) == "peer1"
    assert bad.accepted == 2, "tried again once after 0.5 s, then skipped again"
    time.sleep(0.6)
    eps.ask(talk)
    eps.ask(talk)
    assert bad.accepted == 2, "the second back-off is twice as long"
    time.sleep(0.6)
    bad.mode = "answer"  # it recovers
    assert Counter(eps.ask(talk) for _ in range(4)) == {"peer0": 2, "peer1": 2}


def test_endpoints_in_back_off_are_still_tried_last(peers):
    flaky, good = peers("close", "answer")
    eps = endpoints([flaky, good], backoff=(60, 60))
    for _ in range(3):
        eps.ask(talk)
    assert flaky.accepted == 1
    good.mode = "close"
    flaky.mode = "answer"
    # The healthy one fails now; the one in back-off is the last resort and answers.
    assert eps.ask(talk) == "peer0"


def test_every_problem_is_named_when_none_answers(peers):
    dead = closed_address()
    (closing,) = peers("close")
    eps = endpoints([dead, closing])
    with pytest.raises(EngineError) as caught:
        eps.ask(talk)
    text = str(caught.value)
    assert text.startswith("test: ")
    assert f"{dead}: Connection refused" in text
    # Closed before or after our request reached it: "closed without a reply" or a reset.
    assert f"{closing.address}: connection closed without a reply" in text or \
        f"{closing.address}: Connection reset by peer" in text


def test_an_error_reply_moves_on_without_back_off(peers):
    erring, good = peers("error", "answer")
    eps = endpoints([erring, good], backoff=(60, 60))
    assert Counter(eps.ask(talk) for _ in range(6)) == {"peer1": 6}
    # It answered (badly) every time it was asked: never backed off, so it was asked on
    # every one of its turns, and more once the good peer had served.
    assert erring.accepted >= 3


def test_the_deadline_bounds_the_request_and_blames_no_endpoint(peers):
    silent, good = peers("silent", "answer")
    eps = endpoints([silent, good], timeout=30, backoff=(60, 60))
    outcomes = []
    for _ in range(4):
        start = time.monotonic()
        try:
            outcomes.append(eps.ask(talk, deadline=start + 0.3))
        except EngineError as e:
            outcomes.append(str(e))
        assert time.monotonic() - start < 5, "bounded by the deadline, not by the 30 s timeout"
    # Turn by turn, two of the four requests met the silent peer first and ran out of time.
    assert silent.accepted == 2
    assert sum("time limit reached" in o for o in outcomes) == 2
    assert outcomes.count("peer1") == 2
    # Running out of the request's own time is not the endpoint's failure: no back-off,
    # so the silent peer kept its turn (backed off, it would have got nothing more).


def test_a_deadline_already_past_tries_nothing(peers):
    (good,) = peers("answer")
    with pytest.raises(EngineError, match="time limit reached"):
        endpoints([good]).ask(talk, deadline=time.monotonic() - 1)
    assert good.accepted == 0


def test_many_threads_share_one_list(peers):
    group = peers("answer", "answer", "answer")
    eps = endpoints(group)
    results = []
    lock = threading.Lock()

    def worker():
        for _ in range(50):
            name = eps.ask(talk)
            with lock:
                results.append(name)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    served = Counter(results)
    assert sum(served.values()) == 400
    assert all(served[p.name] >= 80 for p in group), served
    # Whatever the interleaving, the bookkeeping ends where it began.
    assert eps._in_flight == [0, 0, 0]


def test_unix_endpoints_and_bad_specs(tmp_path):
    path = str(tmp_path / "peer.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen()

    def serve():
        conn, _ = listener.accept()
        with conn:
            conn.recv(100)
            conn.sendall(b"unix\n")
    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    seen = []
    assert Endpoints("test", path, 1, 1).ask(lambda sock, unix: seen.append(unix) or talk(sock, unix)) == "unix"
    assert seen == [True]
    listener.close()
    with pytest.raises(ValueError):
        Endpoints("test", path, 1, 1, allow_unix=False)
    for spec in ("", "localhost", "host:99999", "relative.sock"):
        with pytest.raises(ValueError):
            Endpoints("test", spec, 1, 1)
