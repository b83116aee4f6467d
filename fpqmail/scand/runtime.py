"""What requests are served with: the settings, the engines, the policy, the stores,
and who may ask. Built at start and again on SIGHUP; a request keeps the Runtime it
started with.
"""

import os
import pwd
import stat
import threading
import time

from . import policy as policy_file
from .engines import EngineError, make_engine
from .examine import Limits, examine
from .log import logger
from .quarantine import Store, StoreError
from .settings import SettingsError
from .spam import is_spam_spec, make_spam_engine, options_from

#: seconds the health check (PING, the warning at start) waits for the spam engine: a
#: silent one must not hold up the answer about the virus engines
SPAM_PING_LIMIT = 3.0


class Runtime:
    """What a request is served with; replaced whole on SIGHUP."""

    def __init__(self, settings, engines, spam, policy, quarantine, backup, clients, mappable_owners, limits):
        self.settings = settings
        self.engines = engines                  # the virus engines, [(spec, Engine)] in order
        self.spam = spam                        # (spec, SpamEngine) or None
        self.policy = policy                    # policy.PolicyTable
        self.limits = limits                    # what one message may cost (mime.Limits)
        self.quarantine = quarantine
        self.backup = backup
        self.clients = clients                  # uids that may ask for scans on a unix socket
        self.mappable_owners = mappable_owners  # uids whose In is mapped, not read

    @property
    def virus_engines(self):
        return [engine for _, engine in self.engines]

    @property
    def spam_engine(self):
        return self.spam[1] if self.spam else None

    def examine(self, message, fd, deadline):
        return examine(message, fd, self.virus_engines, deadline, self.limits)

    def health(self):
        """None when every virus engine answers its own health check, else the first
        problem. The spam engine is not asked here (spam_health): without it mail
        still flows."""
        for _, engine in self.engines:
            try:
                engine.ping()
            except EngineError as e:
                return f"engine {engine.name}: {e}"
        return None

    def spam_health(self):
        """None when there is no spam engine or it answers its health check within
        SPAM_PING_LIMIT, else its problem."""
        if self.spam is None:
            return None
        try:
            self.spam[1].ping(time.monotonic() + SPAM_PING_LIMIT)
        except EngineError as e:
            return str(e)
        return None


def _engine_settings(settings):
    return {k: v for k, v in settings.raw.items() if k.startswith("FP_SCAND_")}


def build_runtime(settings, previous=None, ping=True) -> Runtime:
    """Engines, policy and stores for settings; raises SettingsError for anything
    unusable.

    The policy file is read every time (on every SIGHUP). Engines are kept (and told to
    reload their signatures) when neither the engine list nor any FP_SCAND_* setting
    changed, else built anew."""
    engine_settings = _engine_settings(settings)
    limits = Limits.from_settings(settings.raw)
    policy = _policy(settings.policy)  # first: a bad file changes nothing, not even a reload
    if previous and previous.settings.engines == settings.engines and \
            _engine_settings(previous.settings) == engine_settings:
        engines, spam = previous.engines, previous.spam
        for _, engine in engines:
            try:
                engine.reload()
            except EngineError as e:
                logger.error("engine %s: reload failed, it keeps its old signatures: %s", engine.name, e)
    else:
        engines, spam = _make_engines(settings.engines, engine_settings)
    if not os.path.isdir(settings.tmpdir):
        raise SettingsError(f"FP_SCAND_TMPDIR={settings.tmpdir}: not a directory")
    stores = []
    for directory in (settings.quarantine, settings.backup):
        try:
            stores.append(Store(directory).create() if directory else None)
        except (OSError, StoreError) as e:
            raise SettingsError(f"{directory}: cannot use as a store: {e}") from None
    runtime = Runtime(settings, engines, spam, policy, stores[0], stores[1], _clients(settings.clients),
                      _mappable_owners(), limits)
    # Only to tell the administrator early; in a thread of its own, because a hung
    # engine must not stop the main thread from accepting and enforcing time limits.
    if ping:  # (--check pings them itself, and waits)
        threading.Thread(target=_warn_unhealthy, args=(runtime,), name="ping", daemon=True).start()
    return runtime


def _make_engines(specs, engine_settings):
    """([(spec, virus engine)], (spec, spam engine) or None) for the engine specs."""
    engines, spam = [], None
    for spec in specs:
        if is_spam_spec(spec) and spam is not None:
            raise SettingsError(f"FP_SCAND_ENGINES: two spam engines ({spam[0]} and {spec}); "
                                "give one, with all its endpoints: rspamd:HOST:PORT,HOST:PORT")
        try:
            if is_spam_spec(spec):
                spam = (spec, make_spam_engine(spec, **options_from(engine_settings)))
            else:
                engines.append((spec, make_engine(spec, engine_settings)))
        except (ValueError, EngineError) as e:
            raise SettingsError(f"engine {spec}: {e}") from None
    if not engines:
        raise SettingsError("FP_SCAND_ENGINES: no virus engine (builtin, clamd:..., fpscand:...); "
                            "a spam engine only scores beside one")
    return engines, spam


def _policy(path):
    if not path:
        return policy_file.no_policy()
    try:
        return policy_file.load(path)
    except policy_file.PolicyError as e:
        raise SettingsError(f"FP_SCAND_POLICY: {e}") from None


def _warn_unhealthy(runtime):
    problem = runtime.health()
    if problem:
        logger.warning("%s: does not answer now (requests fail until it does)", problem)
    problem = runtime.spam_health()
    if problem:
        logger.warning("spam engine %s does not answer now (messages get X-Spam-Status: Unknown, or are "
                       "deferred where the policy says spam-down = tempfail): %s", runtime.spam[0], problem)


def _clients(names):
    """The uids of FP_SCAND_CLIENTS (names or numbers) and the daemon's own. A name no
    user has is logged and skipped: the default names qmailq, which a machine without
    qmail does not have."""
    uids = {os.geteuid()}
    for name in names:
        if name.isdigit():
            uids.add(int(name))
            continue
        try:
            uids.add(pwd.getpwnam(name).pw_uid)
        except KeyError:
            logger.warning("FP_SCAND_CLIENTS: no user %r on this system: skipped", name)
    return frozenset(uids)


def _mappable_owners():
    """Users whose files we map: root, ourselves and qmailq (fp-qmail's user), who do
    not truncate a file under a scan. Anyone else's In is read into memory instead."""
    owners = {0, os.geteuid()}
    try:
        owners.add(pwd.getpwnam("qmailq").pw_uid)
    except KeyError:
        pass
    return frozenset(owners)


def tcp_exposure(settings):
    """A warning for a TCP listener whose temp directory others can list (anyone who
    can list it can name another message's pair: docs/protocol.md), else None."""
    if all(endpoint.startswith("/") for endpoint in settings.listen):
        return None
    try:
        mode = os.stat(settings.tmpdir).st_mode
    except OSError:
        return None  # build_runtime refuses it
    if mode & stat.S_IROTH:
        return (f"FP_SCAND_TMPDIR={settings.tmpdir} can be listed by every user: over TCP, anyone "
                f"who can connect can name another message's files (give it mode 2770, "
                f"or use the unix socket)")
    return None
