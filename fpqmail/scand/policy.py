"""The policy file: per recipient domain or address, what scanning and scoring do to a
message (fpqmail-policy(5) documents the syntax for administrators).

    # comment
    [*]                              the default for every recipient
    spam-tag = 5
    [example.com example.org]        these domains and their subdomains
    spam-reject = 15
    spam-reject-text = Refused as spam (score {score})
    [postmaster@example.com]         one address
    scan = no

A recipient's policy is the section of its address, else of its domain, else of the
nearest parent domain, else `*`, else the built-in defaults; a section's unset keys
come from the next section in that same order. Lookup is a few dict lookups per
recipient, however many sections there are.

A message has one answer for all its recipients (after DATA qmail-smtpd can give only
one), so decide() combines their policies: **the strictest outcome wins** — for a
virus reject, then drop, then deliver cleaned (for a message that cannot be cleaned,
"deliver cleaned" means what fp-qmail does with it by itself: a reject, or a drop when
its On-Virus says drop); for spam reject, then tempfail, then tag, then deliver. Adding a
recipient can therefore never weaken what another recipient's policy asks for. A
tempfail comes only from a condition that ends (the spam engine down, rspamd's soft
reject, whose greylisting lets the retry through), so it delays the other recipients'
copy instead of losing their policy. Only the envelope's
recipients choose a policy: nothing a caller controls otherwise (the client IP or host
name fp-qmail passes on, the sender) does.
"""

from dataclasses import dataclass, fields, replace

from fpqmail import values

from .deadline import check as check_deadline
from .spam import DELIVER, NO, REJECT, SOFT_REJECT, TAG, UNSCORED, YES

DEFAULT = b"*"
NEVER, ENGINE = "never", "engine"
TEMPFAIL, DROP = "tempfail", "drop"  # with DELIVER and REJECT: a Decision's actions
MAX_TEXT = 200

#: the texts of our own temporary refusals
ENGINE_DOWN_TEXT = "spam filter unavailable, try again later"
SOFT_REJECT_TEXT = "try again later"


class PolicyError(ValueError):
    """The policy file cannot be used; the message names the file and the line."""


@dataclass(frozen=True)
class Policy:
    """What one recipient asked for. The defaults are what fpqmail-scand does without a
    policy file."""

    scan: bool = True                 # no: neither scanned nor scored for this recipient
    virus: str = "clean"              # clean (deliver cleaned) | reject | drop
    spam: bool = True                 # score with the spam engine (when one is configured)
    spam_tag: object = ENGINE         # a score | engine | never: X-Spam-Flag: YES from there on
    spam_reject: object = NEVER       # a score | engine | never: refused for good from there on
    spam_reject_text: str = "message refused as spam (score {score})"
    spam_soft_reject: str = TEMPFAIL  # tempfail | ignore: rspamd's soft reject
    spam_down: str = DELIVER          # deliver (X-Spam-Status: Unknown) | tempfail
    spam_user: bool = False           # the recipient's per-user scores (a one-recipient message)


def _flag(text):
    return values.flag(text.lower())


def _choice(*allowed):
    def parse(text):
        if text not in allowed:
            raise ValueError("must be " + " or ".join(allowed))
        return text
    return parse


def _threshold(*words):
    def parse(text):
        if text in words:
            return text
        try:
            return values.number(text, 0, 1_000_000)
        except ValueError:
            raise ValueError("must be a score (a decimal number) or " + " or ".join(words)) from None
    return parse


def _text(text):
    if not text or not values.is_printable_ascii(text) or len(text) > MAX_TEXT:
        raise ValueError(f"must be printable ASCII of at most {MAX_TEXT} characters")
    return text


#: key in the file -> (field of Policy, parser of its value)
KEYS = {
    "scan": ("scan", _flag),
    "virus": ("virus", _choice("clean", "reject", "drop")),
    "spam": ("spam", _flag),
    "spam-tag": ("spam_tag", _threshold(ENGINE, NEVER)),
    "spam-reject": ("spam_reject", _threshold(ENGINE, NEVER)),
    "spam-reject-text": ("spam_reject_text", _text),
    "spam-soft-reject": ("spam_soft_reject", _choice(TEMPFAIL, "ignore")),
    "spam-down": ("spam_down", _choice(DELIVER, TEMPFAIL)),
    "spam-user": ("spam_user", _flag),
}
assert {field for field, _ in KEYS.values()} == {f.name for f in fields(Policy)}


class PolicyTable:
    """Recipient -> Policy, for every recipient. Immutable: a reload builds a new one."""

    def __init__(self, addresses=None, domains=None, default=Policy()):
        self._addresses = addresses or {}  # b"bob@example.com" -> Policy
        self._domains = domains or {}      # b"example.com" -> Policy
        self._default = default

    def for_recipient(self, address: bytes) -> Policy:
        address = address.lower()
        policy = self._addresses.get(address)
        if policy is not None:
            return policy
        at = address.rfind(b"@")
        domain = address[at + 1:] if at >= 0 else b""
        while domain:
            policy = self._domains.get(domain)
            if policy is not None:
                return policy
            domain = domain.partition(b".")[2]
        return self._default

    def for_message(self, recipients, deadline=None) -> "MessagePolicy":
        """The policies of a message's recipients. recipients: an iterable of addresses
        (repeats allowed), taken one at a time: a message to a million recipients keeps
        the few distinct policies they have, never a million of anything. deadline: the
        request's (deadline.check every few thousand recipients)."""
        recipients = iter(recipients)
        single = next(recipients, None)
        distinct = {self.for_recipient(single) if single is not None else self._default: None}
        if not (self._addresses or self._domains):  # everyone has the default: nothing to look up
            if any(recipient != single for recipient in recipients):
                single = None
            return MessagePolicy(list(distinct), single)
        for count, recipient in enumerate(recipients):
            if recipient != single:
                single = None
            if count % 4096 == 0:
                check_deadline(deadline)
            distinct.setdefault(self.for_recipient(recipient), None)
        return MessagePolicy(list(distinct), single)


class MessagePolicy:
    """The policies of one message's recipients, and what follows for the message."""

    def __init__(self, distinct, single=None):
        # Many recipients share a few sections: each distinct policy is judged once.
        self.distinct = distinct
        self.single = single  # the one recipient address of the message, else None

    @property
    def scan(self) -> bool:
        """Scanned (and scored) unless every recipient said scan = no."""
        return any(p.scan for p in self.distinct)

    @property
    def spam(self) -> bool:
        """Scored with the spam engine if some scanned recipient wants it."""
        return any(p.scan and p.spam for p in self.distinct)

    @property
    def spam_user(self):
        """The address whose per-user scores the engine should use: the recipient of a
        message for one address whose policy asks for it; else None (one score serves
        every recipient, so it is the engine's own)."""
        if self.single is not None and self.distinct[0].spam_user:
            return self.single
        return None

    def decide(self, virus_status="clean", spam_result=None, on_virus=None) -> "Decision":
        """The one outcome for the message.

        virus_status: "clean" | "cleaned" | "infected" (the virus engines' verdict).
        spam_result: the SpamResult, or None when not scored (no spam engine).
        on_virus: the client's own On-Virus (deliver|reject|drop), one more vote: a
        caller can make the outcome stricter, never weaker."""
        voters = [p for p in self.distinct if p.scan] or [Policy()]
        if virus_status != "clean":
            votes = [p.virus for p in voters]
            if on_virus:
                votes.append({"deliver": "clean"}.get(on_virus, on_virus))
            if virus_status == "infected":
                # Nothing clean to deliver: "clean" means what fp-qmail does with such a
                # message by itself: its On-Virus drop drops it, anything else refuses it.
                fallback = DROP if on_virus == DROP else "reject"
                votes = [fallback if vote == "clean" else vote for vote in votes]
            action = min(votes, key=("reject", "drop", "clean").index)
            if action != "clean":
                return Decision(REJECT if action == "reject" else DROP, cause="virus")
        spam_voters = [p for p in voters if p.spam]
        if spam_result is None or not spam_voters:
            return Decision(DELIVER)
        outcomes = [_spam_outcome(p, spam_result) for p in spam_voters]
        action, reason, _ = min(outcomes, key=lambda o: _SPAM_ORDER.index(o[0]))
        if action == TAG:
            action = DELIVER  # with the verdict Yes
        cause = "" if action == DELIVER else "spam" if spam_result.known else "spam engine"
        if not spam_result.known:
            return Decision(action, reason, cause, verdict=UNSCORED)
        tagged = [required for outcome, _, required in outcomes if outcome in (TAG, REJECT)]
        required = min(tagged) if tagged else min(required for _, _, required in outcomes)
        return Decision(action, reason, cause, verdict=YES if tagged else NO, required=required)


_SPAM_ORDER = (REJECT, TEMPFAIL, TAG, DELIVER)


def _spam_outcome(policy, result):
    """(reject | tempfail | tag | deliver, SMTP text, the tag threshold) of one policy."""
    if not result.known:
        if policy.spam_down == TEMPFAIL and not result.skipped:
            return TEMPFAIL, ENGINE_DOWN_TEXT, 0.0
        return DELIVER, "", 0.0
    tag_at = result.required if policy.spam_tag in (ENGINE, NEVER) else policy.spam_tag
    if _reached(policy.spam_reject, result, (REJECT,)):
        # As fp-qmail's FP_QMAIL_REJECT_TEXT does {threats}: plain replacement, nothing
        # else in the text is special.
        text = policy.spam_reject_text.replace("{score}", f"{result.score:.1f}").replace(
            "{required}", f"{result.required:.1f}")
        return REJECT, values.printable(text, MAX_TEXT), tag_at
    if result.action == SOFT_REJECT and policy.spam_soft_reject == TEMPFAIL:
        return TEMPFAIL, result.reason or SOFT_REJECT_TEXT, tag_at
    if _reached(policy.spam_tag, result, (TAG, REJECT)):
        return TAG, "", tag_at
    return DELIVER, "", tag_at


def _reached(threshold, result, engine_actions):
    if threshold == NEVER:
        return False
    if threshold == ENGINE:
        return result.action in engine_actions
    return result.score >= threshold


@dataclass(frozen=True)
class Decision:
    """What happens to the message."""

    action: str          # deliver | reject | tempfail | drop
    reason: str = ""     # the SMTP text of a spam reject or of a tempfail
    cause: str = ""      # "virus" | "spam" | "spam engine" | "" (delivered): for the log
    verdict: str = ""    # the X-Spam-Status verdict: Yes | No | Unknown | "" (not scored: no header)
    required: float = 0.0  # the threshold the verdict was measured against


# ---- the file --------------------------------------------------------------------------

def load(path) -> PolicyTable:
    """Read and check the whole policy file; PolicyError naming the line of the first
    mistake. Nothing is half-applied: a caller keeps its old table on an error."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise PolicyError(f"{path}: cannot read: {e.strerror}") from None
    return parse(data, str(path))


def parse(data: bytes, name="policy") -> PolicyTable:
    sections = {}   # target -> {field: value}
    where = {}      # target -> line of its section
    current = None
    for number, raw in enumerate(data.split(b"\n"), 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise PolicyError(f"{name} line {number}: not UTF-8 text") from None
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            if not line.endswith("]") or not line[1:-1].split():
                raise PolicyError(f"{name} line {number}: a section is [target ...], e.g. [example.com]")
            current = {}
            for word in line[1:-1].split():
                target = _target(word, name, number)
                if target in where:
                    raise PolicyError(f"{name} line {number}: {word} already has a section on line {where[target]}")
                where[target] = number
                sections[target] = current  # several targets share one section's settings
            continue
        key, equals, value = line.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not equals or not key:
            raise PolicyError(f"{name} line {number}: expected [target] or key = value, "
                              f"not {values.printable(line, 60)!r}")
        if key not in KEYS:
            raise PolicyError(f"{name} line {number}: unknown key {values.printable(key, 40)!r} "
                              f"(known: {', '.join(KEYS)})")
        if current is None:
            raise PolicyError(f"{name} line {number}: {key} outside a section (start with [*] for the default)")
        field, parse_value = KEYS[key]
        if field in current:
            raise PolicyError(f"{name} line {number}: {key} set twice in one section")
        try:
            current[field] = parse_value(value)
        except ValueError as e:
            raise PolicyError(f"{name} line {number}: {key} = {values.printable(value, 60)}: {e}") from None
    return _resolve(sections)


def _target(word, name, number):
    target = word.lower().encode("utf-8")
    if target == DEFAULT:
        return target
    local, at, domain = target.rpartition(b"@")
    if (at and not local) or not domain or domain.startswith(b".") or domain.endswith(b".") \
            or b".." in domain or b"[" in target or b"*" in target:
        raise PolicyError(f"{name} line {number}: {values.printable(word, 60)!r} is not *, a domain "
                          "(example.com) or an address (user@example.com)")
    return target


def _resolve(sections):
    """Every section's settings completed from the less specific sections above it."""
    addresses, domains = {}, {}
    chains = {}
    for target in sections:
        if target == DEFAULT:
            continue
        local, at, domain = target.rpartition(b"@")
        parents = []
        while domain:  # an address's domain and its parents; a domain's parents
            if domain != target:
                parents.append(domain)
            domain = domain.partition(b".")[2]
        chains[target] = parents
    default = replace(Policy(), **sections.get(DEFAULT, {}))
    for target, parents in chains.items():
        policy = default
        for parent in reversed(parents):
            if parent in sections:
                policy = replace(policy, **sections[parent])
        policy = replace(policy, **sections[target])
        (addresses if b"@" in target else domains)[target] = policy
    return PolicyTable(addresses, domains, default)


def no_policy() -> PolicyTable:
    """The table without a policy file: the defaults for everyone."""
    return PolicyTable()
