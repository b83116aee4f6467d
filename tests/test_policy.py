"""The policy file (fpqmail/scand/policy.py, fpqmail-policy(5)): its syntax and errors,
how a recipient finds its policy, and the one outcome of a message for all its
recipients: unit tests on the decision, then two domains' policies against the real
rspamd and spamd (tests/spam_fixtures.py)."""

import itertools
import re
import subprocess

import pytest

from conftest import REPO
from fpqmail.scand import policy as pol
from fpqmail.scand.policy import DELIVER, DROP, TEMPFAIL, Policy, PolicyError, load, parse
from fpqmail.scand.spam import (GREYLIST, NO, REJECT, SOFT_REJECT, TAG, UNKNOWN, UNSCORED, YES, SpamResult,
                                header_block, make_spam_engine, unknown)

pytest.register_assert_rewrite("spam_fixtures")
from spam_fixtures import HAM, SPAM  # noqa: E402

pytest_plugins = ["spam_fixtures"]


def table(text):
    return parse(text.encode(), "policy")


# ---- the file --------------------------------------------------------------------------

def test_without_a_file_everyone_gets_the_defaults():
    assert pol.no_policy().for_recipient(b"anyone@anywhere.example") == Policy()
    assert table("# only a comment\n\n").for_recipient(b"bob@example.com") == Policy()


def test_address_then_domain_then_parents_then_default():
    t = table("""
[*]
spam-tag = 5
[example.com]
spam-reject = 15
[sales.example.com]
spam-tag = 3
[bob@sales.example.com]
scan = no
[other.example alice@example.com]
virus = reject
""")
    default = Policy(spam_tag=5)
    assert t.for_recipient(b"x@elsewhere.example") == default
    assert t.for_recipient(b"x@example.com") == Policy(spam_tag=5, spam_reject=15)
    assert t.for_recipient(b"x@deep.down.example.com") == Policy(spam_tag=5, spam_reject=15), "parents count"
    assert t.for_recipient(b"x@sales.example.com") == Policy(spam_tag=3, spam_reject=15)
    assert t.for_recipient(b"BOB@Sales.Example.COM") == Policy(scan=False, spam_tag=3, spam_reject=15)
    assert t.for_recipient(b"alice@example.com") == Policy(virus="reject", spam_tag=5, spam_reject=15)
    assert t.for_recipient(b"y@other.example") == Policy(virus="reject", spam_tag=5)
    assert t.for_recipient(b"xexample.com@evil.example") == default, "the domain is after the last @"
    assert t.for_recipient(b"notexample.com") == default and t.for_recipient(b"") == default
    assert t.for_recipient(b"x@com") == default


def test_every_key_and_its_values():
    t = table("""[example.com]
scan = no
virus = drop
spam = No
spam-tag = never
spam-reject = 12.5
spam-reject-text = 5.7.1 go away ({score}/{required}) #not a comment
spam-soft-reject = ignore
spam-down = tempfail
spam-user = yes
""")
    assert t.for_recipient(b"a@example.com") == Policy(
        scan=False, virus="drop", spam=False, spam_tag="never", spam_reject=12.5,
        spam_reject_text="5.7.1 go away ({score}/{required}) #not a comment",
        spam_soft_reject="ignore", spam_down="tempfail", spam_user=True)


@pytest.mark.parametrize("text, line, words", [
    ("spam-tag = 5\n", 1, "outside a section"),
    ("[*]\nspam-tagg = 5\n", 2, "unknown key 'spam-tagg'"),
    ("[*]\n\n# c\nspam-tag = five\n", 4, "spam-tag = five: must be a score"),
    ("[*]\nspam-tag = -1\n", 2, "must be a score"),
    ("[*]\nvirus = quarantine\n", 2, "must be clean or reject or drop"),
    ("[*]\nscan = maybe\n", 2, "scan = maybe"),
    ("[*]\nspam-tag = 5\nspam-tag = 6\n", 3, "set twice"),
    ("[a.example]\n[b.example A.example]\n", 2, "A.example already has a section on line 1"),
    ("[a.example\n", 1, "a section is [target ...]"),
    ("[]\n", 1, "a section is [target ...]"),
    ("[@a.example]\n", 1, "is not *, a domain"),
    ("[bob@]\n", 1, "is not *, a domain"),
    ("[.a.example]\n", 1, "is not *, a domain"),
    ("[*.a.example]\n", 1, "is not *, a domain"),
    ("[*]\njust words\n", 2, "expected [target] or key = value"),
    ("[*]\nspam-reject-text = caf\xe9\n", 2, "printable ASCII"),
    ("[*]\nspam-reject-text =\n", 2, "printable ASCII"),
    ("[*]\nspam-reject-text = " + "x" * 201 + "\n", 2, "at most 200"),
])
def test_mistakes_name_their_line(text, line, words):
    with pytest.raises(PolicyError) as caught:
        table(text)
    assert str(caught.value).startswith(f"policy line {line}: "), caught.value
    assert words in str(caught.value), caught.value


def test_load_reads_a_file_and_names_it(tmp_path):
    path = tmp_path / "policy"
    path.write_bytes(b"[*]\nspam-tag = 4\n")
    good = load(path)
    assert good.for_recipient(b"a@b.example").spam_tag == 4
    path.write_bytes(b"[*]\nspam-tag = 4\n\xff\n")
    with pytest.raises(PolicyError, match=f"^{re.escape(str(path))} line 3: not UTF-8 text$"):
        load(path)
    with pytest.raises(PolicyError, match=f"^{re.escape(str(tmp_path / 'none'))}: cannot read: No such file"):
        load(tmp_path / "none")
    # What a reload that fails leaves in place: the table loaded before, untouched.
    assert good.for_recipient(b"a@b.example").spam_tag == 4


def test_many_domains():
    count = 20_000
    text = "[*]\nspam-tag = 5\n" + "".join(f"[d{n}.example]\nspam-reject = {n % 50 + 1}\n" for n in range(count))
    t = table(text)
    for n in (0, 1, count // 2, count - 1):
        assert t.for_recipient(b"x@d%d.example" % n).spam_reject == n % 50 + 1
        assert t.for_recipient(b"x@sub.d%d.example" % n).spam_reject == n % 50 + 1
    assert t.for_recipient(b"x@d%d.example" % count).spam_reject == "never"


def test_the_example_of_the_man_page_means_what_it_says():
    page = (REPO / "packaging" / "man" / "fpqmail-policy.5").read_text()
    example = page.split(".SH EXAMPLE\n.EX\n")[1].split("\n.EE\n")[0].replace("\\-", "-")
    t = table(example)
    ours = t.for_recipient(b"bob@example.org")
    assert (ours.spam_tag, ours.spam_reject) == (5, 15)
    assert t.for_recipient(b"joe@customer.example.net") == Policy(virus="reject", spam_tag=5,
                                                                  spam_soft_reject="ignore")
    assert t.for_recipient(b"abuse@example.com").spam is False
    assert t.for_recipient(b"abuse@example.com").spam_reject == 15, "and the rest from example.com"


def test_the_man_page_documents_every_key_and_default():
    text = subprocess.run(["groff", "-man", "-Tascii", "-rHY=0", "-rLL=300n", "-P-cbou",
                           str(REPO / "packaging" / "man" / "fpqmail-policy.5")],
                          check=True, capture_output=True, text=True).stdout
    # A short key and its paragraph share a line; a long one has its own.
    documented = dict(re.findall(r"^ {7}(\S+)(?:\n {14}| +)Default: +(.*?)\.(?: |$)", text, re.M))
    defaults = Policy()
    assert set(documented) == set(pol.KEYS)
    for key, (field, _) in pol.KEYS.items():
        value = getattr(defaults, field)
        expected = ("yes" if value else "no") if isinstance(value, bool) else str(value)
        assert " ".join(documented[key].split()) == expected, key


# ---- one outcome per message ---------------------------------------------------------------

A, B = b"joe@a.example", b"ann@b.example"
TWO_DOMAINS = """
[a.example]
spam-reject = 10
spam-down = tempfail
[b.example]
spam-tag = 5
"""


def rspamd_says(action, score, required=15.0, text=""):
    return SpamResult("rspamd", action, score, required, ("SYMBOL",), reason=text)


def spamd_says(score, required=5.0):
    return SpamResult("spamd", TAG if score >= required else "deliver", score, required, ("SYMBOL",))


def decide(text, recipients, result=None, virus="clean", on_virus=None):
    return table(text).for_message(recipients).decide(virus, result, on_virus)


def test_virus_strictest_wins_and_the_client_only_tightens():
    text = "[a.example]\nvirus = reject\n[b.example]\nvirus = drop\n[c.example]\nvirus = clean\n"
    c = b"x@c.example"
    assert decide(text, [c], virus="cleaned").action == DELIVER
    assert decide(text, [c], virus="infected") == pol.Decision("reject", cause="virus"), "nothing clean to deliver"
    assert decide(text, [B, c], virus="cleaned") == pol.Decision(DROP, cause="virus")
    assert decide(text, [B, c], virus="infected").action == "reject", "c's clean is a refusal here"
    assert decide(text, [A, B, c], virus="cleaned").action == "reject"
    assert decide(text, [c], virus="cleaned", on_virus="drop").action == DROP
    assert decide(text, [A], virus="cleaned", on_virus="deliver").action == "reject", "a caller cannot weaken"
    # The virus verdict wins over the spam score.
    assert decide(text, [A], rspamd_says(TAG, 7), virus="infected").cause == "virus"
    assert decide(text, [A], virus="clean", on_virus="deliver").action == DELIVER


def test_a_virus_that_cannot_be_cleaned_is_dropped_where_fp_qmail_itself_would_drop_it():
    # "clean" cannot be had: it means what fp-qmail does with such a message by itself.
    text = "[a.example]\nvirus = reject\n"
    c = b"x@c.example"
    assert decide(text, [c], virus="infected", on_virus="drop") == pol.Decision(DROP, cause="virus")
    assert decide(text, [c], virus="infected", on_virus="deliver").action == "reject"
    assert decide(text, [A, c], virus="infected", on_virus="drop").action == "reject", "A's reject is stricter"


def test_spam_thresholds_are_inclusive():
    text = "[*]\nspam-tag = 5\nspam-reject = 15\n"
    assert decide(text, [A], rspamd_says("deliver", 4.9)) == pol.Decision(DELIVER, verdict=NO, required=5)
    assert decide(text, [A], rspamd_says("deliver", 5.0)) == pol.Decision(DELIVER, verdict=YES, required=5)
    refused = decide(text, [A], rspamd_says(REJECT, 15.0))
    assert (refused.action, refused.cause, refused.reason) == (REJECT, "spam", "message refused as spam (score 15.0)")


def test_engine_means_the_engines_own_judgement():
    engine = "[*]\nspam-tag = engine\nspam-reject = engine\n"
    assert decide(engine, [A], rspamd_says("deliver", 5.5)).verdict == NO
    assert decide(engine, [A], rspamd_says(GREYLIST, 5.5)).verdict == NO
    tagged = decide(engine, [A], rspamd_says(TAG, 6.5))
    assert (tagged.action, tagged.verdict, tagged.required) == (DELIVER, YES, 15.0), "rspamd's required_score"
    assert decide(engine, [A], rspamd_says(REJECT, 16)).action == REJECT
    assert decide(engine, [A], spamd_says(4.9)).verdict == NO
    spam = decide(engine, [A], spamd_says(1000.0))
    assert (spam.action, spam.verdict, spam.required) == (DELIVER, YES, 5.0), "spamd never says reject"
    never = "[*]\nspam-tag = never\n"
    assert decide(never, [A], spamd_says(1000.0)) == pol.Decision(DELIVER, verdict=NO, required=5.0)


def test_soft_reject_and_greylist():
    soft = rspamd_says(SOFT_REJECT, 4.5, text="Try again later")
    assert decide("", [A], soft) == pol.Decision(TEMPFAIL, "Try again later", "spam", verdict=NO, required=15.0)
    assert decide("", [A], rspamd_says(SOFT_REJECT, 4.5)).reason == pol.SOFT_REJECT_TEXT
    assert decide("[*]\nspam-soft-reject = ignore\n", [A], soft).action == DELIVER
    # rspamd's bare greylist action (no greylist module remembers anything): never a refusal.
    assert decide("", [A], rspamd_says(GREYLIST, 4.5)).action == DELIVER
    # A reject threshold passed wins over the soft reject: permanent over temporary.
    assert decide("[*]\nspam-reject = 4\n", [A], soft).action == REJECT


def test_engine_down_and_too_large():
    down = unknown("rspamd", "rspamd: 127.0.0.1:11333: Connection refused")
    skipped = unknown("rspamd", "not scored: 600000 bytes, over the limit of 512000", skipped=True)
    assert decide(TWO_DOMAINS, [B], down) == pol.Decision(DELIVER, verdict=UNSCORED)
    assert decide(TWO_DOMAINS, [A], down) == pol.Decision(TEMPFAIL, pol.ENGINE_DOWN_TEXT, "spam engine",
                                                          verdict=UNSCORED)
    assert decide(TWO_DOMAINS, [A, B], down).action == TEMPFAIL
    assert decide(TWO_DOMAINS, [A, B], skipped) == pol.Decision(DELIVER, verdict=UNSCORED), \
        "a retry would be just as large: never tempfail for the size"


def test_two_domains_and_a_message_to_both():
    spam, ham = rspamd_says(REJECT, 15.0), rspamd_says("deliver", 0.2)
    assert decide(TWO_DOMAINS, [A], spam).action == REJECT
    assert decide(TWO_DOMAINS, [B], spam) == pol.Decision(DELIVER, verdict=YES, required=5)
    assert decide(TWO_DOMAINS, [A, B], spam).action == REJECT
    assert decide(TWO_DOMAINS, [B, A], spam).action == REJECT
    both = decide(TWO_DOMAINS, [A, B], ham)
    assert (both.action, both.verdict) == (DELIVER, NO)
    # Marked as spam when one recipient's threshold says so; the lowest that did is shown.
    mid = decide(TWO_DOMAINS, [A, B], rspamd_says(TAG, 7.0))
    assert (mid.action, mid.verdict, mid.required) == (DELIVER, YES, 5)


def test_recipients_who_opt_out_have_no_vote():
    text = TWO_DOMAINS + "[c.example]\nscan = no\n[d.example]\nspam = no\n"
    c, d = b"x@c.example", b"x@d.example"
    assert not table(text).for_message([c]).scan
    assert table(text).for_message([c, B]).scan
    assert not table(text).for_message([d]).spam and table(text).for_message([d]).scan
    assert decide(text, [c, A], rspamd_says(REJECT, 15.0)).action == REJECT
    assert decide(text, [d], rspamd_says(REJECT, 15.0)) == pol.Decision(DELIVER)
    assert decide(text, [d, B], rspamd_says(REJECT, 15.0)).verdict == YES


def test_adding_a_recipient_never_weakens_anothers_policy():
    text = """
[r.example]
spam-reject = 10
virus = reject
[t.example]
spam-tag = 3
spam-down = tempfail
[d.example]
virus = drop
spam-soft-reject = ignore
[n.example]
scan = no
[s.example]
spam = no
"""
    recipients = [b"x@%s.example" % k for k in (b"r", b"t", b"d", b"n", b"s", b"other")]
    results = [None, rspamd_says("deliver", 1), rspamd_says(TAG, 7), rspamd_says(REJECT, 20),
               rspamd_says(SOFT_REJECT, 4), rspamd_says(GREYLIST, 4), unknown("rspamd", "down"),
               unknown("rspamd", "big", skipped=True), spamd_says(2), spamd_says(12)]
    rank = {"reject": 0, DROP: 1, TEMPFAIL: 2, DELIVER: 3}
    for virus, result, on_virus in itertools.product(("clean", "cleaned", "infected"), results,
                                                     (None, "deliver", "drop", "reject")):
        for one in recipients:
            alone = decide(text, [one], result, virus, on_virus)
            for other in recipients:
                together = decide(text, [one, other], result, virus, on_virus)
                if table(text).for_recipient(one).scan:
                    assert rank[together.action] <= rank[alone.action], (one, other, virus, result)
                    if together.action == alone.action == DELIVER and alone.verdict == YES:
                        assert together.verdict == YES


def test_a_message_to_very_many_recipients_is_judged_by_its_few_distinct_policies():
    from fpqmail.scand.protocol import Envelope
    t = table(TWO_DOMAINS)
    other = b"z@other.example"
    many = Envelope(b"alice@example.org", [A] * 100_000 + [B, other] + [A] * 10)
    assert sorted(many.distinct_recipients(stretch=1)) == sorted([A] * 100_010 + [B, other])
    assert sorted(set(many.distinct_recipients())) == sorted({A, B, other})
    assert len(list(many.distinct_recipients())) < 100, "repeats within a stretch count once"
    judged = t.for_message(many.distinct_recipients())
    assert set(judged.distinct) == {t.for_recipient(A), t.for_recipient(B), t.for_recipient(other)}
    assert judged.single is None and judged.decide("clean", rspamd_says(REJECT, 15.0)).action == REJECT
    # One address, however often it is repeated, is one recipient for spam-user.
    assert table("[*]\nspam-user = yes\n").for_message(Envelope(b"", [A] * 30_000).distinct_recipients()).spam_user == A
    assert pol.no_policy().for_message(many.distinct_recipients()).distinct == [Policy()]
    assert pol.no_policy().for_message([]).distinct == [Policy()]


def test_spam_user_only_for_one_recipient():
    t = table("[a.example]\nspam-user = yes\n")
    assert t.for_message([A]).spam_user == A
    assert t.for_message([B]).spam_user is None
    assert t.for_message([A, b"ann@a.example"]).spam_user is None


# ---- with the real engines ----------------------------------------------------------------

@pytest.fixture(params=["rspamd", "spamd"])
def engine(request):
    return make_spam_engine(request.getfixturevalue(request.param).tcp_spec)


def test_two_domains_with_a_real_engine(engine):
    t = table(TWO_DOMAINS)
    spam = engine.score(SPAM, b"alice@example.org", [A, B])
    ham = engine.score(HAM, b"alice@example.org", [A, B])
    # Domain A rejects spam, with the administrator's text; domain B tags it.
    refused = t.for_message([A]).decide("clean", spam)
    assert refused.action == REJECT and refused.reason.startswith("message refused as spam (score 1")
    tagged = t.for_message([B]).decide("clean", spam)
    assert (tagged.action, tagged.verdict) == (DELIVER, YES)
    block = header_block(spam, tagged.verdict, tagged.required, b"\r\n")
    assert block.startswith(b"X-Spam-Status: Yes, score=") and b"tests=GTUBE" in block
    assert block.endswith(b"\r\nX-Spam-Flag: YES\r\n")
    # The same spam to both: the strictest wins, refused for both.
    assert t.for_message([A, B]).decide("clean", spam).action == REJECT
    # An ordinary message to both: delivered, with its score.
    for recipients in ([A], [B], [A, B]):
        d = t.for_message(recipients).decide("clean", ham)
        assert (d.action, d.verdict) == (DELIVER, NO)
    assert header_block(ham, NO, 5.0).startswith(b"X-Spam-Status: No, score=%.1f required=5.0" % ham.score)


@pytest.mark.parametrize("kind", ["rspamd", "spamd"])
def test_an_engine_down_under_two_policies(kind, tmp_path):
    # The engine stopped for good is tests/test_spam.py's; here its socket is gone.
    engine = make_spam_engine(f"{kind}:{tmp_path}/stopped.sock")
    t = table(TWO_DOMAINS)
    down = engine.score(HAM, b"alice@example.org", [A, B])
    assert down.action == UNKNOWN and "stopped.sock" in down.reason
    assert t.for_message([B]).decide("clean", down) == pol.Decision(DELIVER, verdict=UNSCORED)
    assert header_block(down, UNSCORED, 0.0, b"\r\n") == b"X-Spam-Status: Unknown\r\n"
    assert t.for_message([A]).decide("clean", down).action == TEMPFAIL
    assert t.for_message([A, B]).decide("clean", down).action == TEMPFAIL


def test_rspamd_reject_at_15(rspamd):
    """The acceptance case, as far as the daemon's side goes: GTUBE through rspamd with
    reject from 15 is refused for good (tests/test_scand_spam.py takes it through fp-qmail: exit 82)."""
    spam = make_spam_engine(rspamd.unix_spec).score(SPAM, b"alice@example.org", [A])
    decision = table("[*]\nspam-reject = 15\nspam-reject-text = 5.7.1 spam, score {score}\n") \
        .for_message([A]).decide("clean", spam)
    assert (decision.action, decision.reason) == (REJECT, "5.7.1 spam, score 15.0")
