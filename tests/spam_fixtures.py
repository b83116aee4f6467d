"""Private, real spam engines for the tests: Debian's rspamd and SpamAssassin's spamd.

A pytest plugin: a test module that uses it says `pytest_plugins = ["spam_fixtures"]`,
so the session fixtures `rspamd` and `spamd` exist once per test session however many
modules use them. Both engines are slow to start (rspamd compiles its regular
expressions, ~15 s on a fresh machine; spamd a few seconds), so the plugin starts the
ones the selected tests need as soon as collection is over, in the background, and a
fixture waits only for what is not ready yet.

Each instance runs from a temp directory of its own, on a free port of 127.0.0.1 and a
unix socket, with every network check off (no DNS, RBL, URIBL, map downloads: rspamd's
resolver points at a loopback port where nothing answers), and is stopped by its
process group. rspamd runs as its package's user `_rspamd`, spamd as `nobody`; their
directories are made for them. `start_rspamd`/`start_spamd` start more instances for
one test (three for the load test, one to stop); rspamd's compiled expressions are
shared by all instances of a session, so the extra ones start in about a second.
"""

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

RSPAMD = "/usr/bin/rspamd"
SPAMD = "/usr/sbin/spamd"
GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def message(body, subject=b"lunch tomorrow", newline=b"\r\n"):
    """A message with the full headers a real one has, so that no engine scores it for
    what is missing (no Date, no Message-ID, no Received line)."""
    lines = [
        b"Received: from mx.example.org (mx.example.org [93.184.216.34])",
        b"\tby mail.example.net with ESMTP id 4242; Sun, 29 Nov 2026 14:00:00 +0000",
        b"Date: Sun, 29 Nov 2026 14:00:00 +0000",
        b"From: Alice <alice@example.org>",
        b"To: Bob <bob@example.net>",
        b"Subject: " + subject,
        b"Message-ID: <20261129140000.4242@mx.example.org>",
        b"MIME-Version: 1.0",
        b"Content-Type: text/plain; charset=us-ascii",
        b"",
    ]
    return newline.join(lines) + newline + body.replace(b"\n", newline)


HAM = message(b"Hi Bob,\n\nshall we have lunch tomorrow at noon? The usual place.\n\nAlice\n")
SPAM = message(b"This is the GTUBE, the spam test string:\n\n" + GTUBE + b"\n", subject=b"test")

# rspamd modules that look things up on the network (DNS lists, SPF, DKIM, DMARC, ASN,
# fuzzy hashes, downloaded maps) or keep state in redis: off in the tests.
RSPAMD_OFF = ("rbl", "surbl", "emails", "spf", "dkim", "dmarc", "arc", "asn", "fuzzy_check",
              "phishing", "whitelist", "multimap", "mid", "mime_types", "url_redirector",
              "rspamd_update", "neural", "reputation", "mx_check", "dcc", "p0f", "hfilter",
              "greylist", "ratelimit", "replies", "history_redis")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _own(path, user):
    account = pwd.getpwnam(user)
    os.chown(path, account.pw_uid, account.pw_gid)


class _Engine:
    """One engine process in a directory of its own, in a process group of its own."""

    kind = "engine"
    READY_WITHIN = 60

    def __init__(self, directory, port=None):
        self.dir = directory
        self.port = port or _free_port()
        self.socket_path = os.path.join(directory, f"{self.kind}.sock")
        self.process = None
        self._log = None

    @property
    def tcp_spec(self):
        return f"{self.kind}:127.0.0.1:{self.port}"

    @property
    def unix_spec(self):
        return f"{self.kind}:{self.socket_path}"

    def launch(self):
        """Start the process; ready() waits for its answer."""
        command = self._prepare()
        self._log = open(os.path.join(self.dir, "stderr"), "ab")
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=self._log,
                                        stderr=self._log, start_new_session=True, cwd=self.dir)
        self._ready_by = time.monotonic() + self.READY_WITHIN
        return self

    def ready(self):
        while not self.answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.kind} exited {self.process.returncode}: {self.log()[-5000:]}")
            if time.monotonic() > self._ready_by:
                self.stop()
                raise RuntimeError(f"{self.kind} did not answer within {self.READY_WITHIN} s: {self.log()[-5000:]}")
            time.sleep(0.05)
        return self

    def start(self):
        return self.launch().ready()

    def signal(self, signum):
        """To the whole process group: rspamd and spamd fork their workers."""
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def stop(self):
        if self.process is None:
            return
        if self.process.poll() is None:
            self.signal(signal.SIGCONT)  # a test may have frozen it
            self.signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.process.wait()
        self.signal(signal.SIGKILL)  # workers a killed master left behind
        self._log.close()
        self.process = None

    def kill(self):
        """SIGKILL, as a crash: the listening sockets go away with the processes."""
        self.signal(signal.SIGKILL)
        self.process.wait()
        self._log.close()
        self.process = None

    def log(self):
        """The engine's stderr and, for rspamd, its log file."""
        texts = []
        for name in ("stderr", os.path.join("log", "rspamd.log")):
            try:
                with open(os.path.join(self.dir, name), errors="replace") as f:
                    texts.append(f.read())
            except OSError:
                pass
        return "\n".join(texts)

    def _ask(self, request, family=socket.AF_INET):
        try:
            with socket.socket(family) as s:
                s.settimeout(2)
                s.connect(("127.0.0.1", self.port) if family == socket.AF_INET else self.socket_path)
                s.sendall(request)
                reply = b""
                while len(reply) < 4096:
                    chunk = s.recv(4096)
                    if not chunk:
                        break
                    reply += chunk
                return reply
        except OSError:
            return b""


class Rspamd(_Engine):
    kind = "rspamd"
    READY_WITHIN = 180  # the first instance on a fresh machine compiles for ~15 s, more under load

    def __init__(self, directory, hs_cache, port=None):
        super().__init__(directory, port)
        self.hs_cache = hs_cache

    def _prepare(self):
        local = os.path.join(self.dir, "local.d")
        for sub in ("local.d", "db", "run", "log"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        with open(os.path.join(self.dir, "rspamd.conf"), "w") as f:
            f.write(f"""# fp-qmail tests: the package's rules, nothing else of /etc/rspamd's local parts
.include "$CONFDIR/common.conf"
options {{
    pidfile = "$RUNDIR/rspamd.pid";
    .include "$CONFDIR/options.inc"
    .include(priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/options.inc"
}}
logging {{
    type = "file";
    filename = "$LOGDIR/rspamd.log";
    level = "notice";
}}
worker "normal" {{
    bind_socket = "127.0.0.1:{self.port}";
    bind_socket = "{self.socket_path} mode=0666";
    count = 1;
    .include "$CONFDIR/worker-normal.inc"
}}
""")
        with open(os.path.join(local, "options.inc"), "w") as f:
            # Nothing listens on UDP port 1 of the loopback: every DNS query fails at once.
            f.write('dns { nameserver = ["127.0.0.1:1"]; timeout = 0.2s; retransmits = 1; }\n'
                    f'hs_cache_dir = "{self.hs_cache}";\n')
        for module in RSPAMD_OFF:
            with open(os.path.join(local, f"{module}.conf"), "w") as f:
                f.write("enabled = false;\n")
        for root, dirs, files in os.walk(self.dir):
            for name in dirs + files:
                _own(os.path.join(root, name), "_rspamd")
        _own(self.dir, "_rspamd")
        return [RSPAMD, "-f", "-u", "_rspamd", "-g", "_rspamd", "-c", os.path.join(self.dir, "rspamd.conf"),
                f"--var=LOCAL_CONFDIR={self.dir}", f"--var=DBDIR={self.dir}/db",
                f"--var=RUNDIR={self.dir}/run", f"--var=LOGDIR={self.dir}/log"]

    def answers(self):
        return self._ask(b"GET /ping HTTP/1.0\r\n\r\n").endswith(b"pong\r\n")


class Spamd(_Engine):
    kind = "spamd"

    def _prepare(self):
        site = os.path.join(self.dir, "site")
        home = os.path.join(self.dir, "home")
        os.makedirs(site, exist_ok=True)
        os.makedirs(home, exist_ok=True)
        # The package's plugin list, and our own local.cf: no learning, no network.
        for name in os.listdir("/etc/spamassassin"):
            if name.endswith(".pre"):
                shutil.copy(os.path.join("/etc/spamassassin", name), site)
        with open(os.path.join(site, "local.cf"), "w") as f:
            f.write("use_bayes 0\nbayes_auto_learn 0\ndns_available no\nskip_rbl_checks 1\n")
        _own(home, "nobody")
        os.chmod(self.dir, 0o755)
        return [SPAMD, f"--listen=127.0.0.1:{self.port}", f"--listen={self.socket_path}", "--socketmode=0666",
                "--local", "--nouser-config", f"--siteconfigpath={site}", f"--helper-home-dir={home}",
                f"--pidfile={self.dir}/spamd.pid", "--syslog=stderr", "-u", "nobody", "-g", "nogroup",
                "--max-children=2", "--min-children=1"]

    def answers(self):
        return self._ask(b"PING SPAMC/1.5\r\n\r\n").startswith(b"SPAMD/1.5 0 PONG")


class _Session:
    """The engines of one test session, and the directory they live in."""

    def __init__(self):
        self.root = None
        self.shared = {}   # kind -> the session's instance
        self.extra = []

    def directory(self, name):
        path = tempfile.mkdtemp(prefix=name + "-", dir=self._root())
        os.chmod(path, 0o755)
        return path

    def _root(self):
        if self.root is None:
            # Not pytest's temp dir: that is root's alone (0700), and the engines drop
            # to their own users. hs/: rspamd's compiled expressions, for every instance.
            self.root = tempfile.mkdtemp(prefix="fpqmail-spam-")
            os.chmod(self.root, 0o755)
            os.mkdir(os.path.join(self.root, "hs"))
            _own(os.path.join(self.root, "hs"), "_rspamd")
        return self.root

    def new(self, kind, port=None):
        if kind == "rspamd":
            return Rspamd(self.directory(kind), os.path.join(self._root(), "hs"), port)
        return Spamd(self.directory(kind), port)

    def launch(self, kind):
        if kind not in self.shared:
            binary = RSPAMD if kind == "rspamd" else SPAMD
            if not os.path.exists(binary):
                pytest.fail(f"{binary} is missing: run scripts/install-deps (installs rspamd, spamassassin, spamd)")
            self.shared[kind] = self.new(kind).launch()
        return self.shared[kind]

    def close(self):
        for engine in list(self.shared.values()) + self.extra:
            engine.stop()
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)


_session = _Session()


def pytest_collection_finish(session):
    """Start the engines the selected tests will use, before the first test runs."""
    wanted = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    for kind, binary in (("rspamd", RSPAMD), ("spamd", SPAMD)):
        # A missing engine fails its tests, with the fixture's message, not the session.
        if (kind in wanted or f"start_{kind}" in wanted) and os.path.exists(binary):
            _session.launch(kind)


def pytest_sessionfinish(session):
    _session.close()


@pytest.fixture(scope="session")
def rspamd():
    """The session's rspamd (Rspamd: tcp_spec, unix_spec, port, socket_path)."""
    return _session.launch("rspamd").ready()


@pytest.fixture(scope="session")
def spamd():
    """The session's spamd (Spamd: tcp_spec, unix_spec, port, socket_path)."""
    return _session.launch("spamd").ready()


def _starter(kind):
    def fixture():
        started = []

        def start(port=None):
            if kind == "rspamd":
                _session.launch("rspamd").ready()  # its compiled expressions make the rest quick
            engine = _session.new(kind, port)
            started.append(engine)
            return engine.start()

        yield start
        for engine in started:
            engine.stop()
    return fixture


start_rspamd = pytest.fixture(_starter("rspamd"))
start_spamd = pytest.fixture(_starter("spamd"))
