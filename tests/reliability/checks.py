"""What every fault test asserts about one message's fate, in one place.

qmail's callers (qmail-smtpd) tell three kinds of outcome apart
(../shared/reference/qmail-queue.md): success (exit 0), permanent (11..40, or 82 with
a D text on fd 6: the sender is told 554) and temporary (everything else, a crash
included, or 82 without a D text: 451, the sender retries). Mail is never lost when a
success means qmail-queue.orig has the whole message and envelope, and anything else
means it has nothing at all.
"""
SUCCESS, TEMPORARY, PERMANENT = "success", "temporary", "permanent"


def kind(result):
    code = result.code
    if code == 0:
        return SUCCESS
    if code == 82:
        return PERMANENT if (result.fd6_text or b"").startswith(b"D") else TEMPORARY
    if 11 <= code <= 40:
        return PERMANENT
    return TEMPORARY  # 51..91, exit 1 of a refusing interpreter, killed by a signal


def held(result, expected_kind, cause=None, message=None, envelope=None):
    """The outcome is of the expected kind, the queue got all or nothing, and the log
    names the cause. message/envelope: what the queue must have got on success
    (byte-identical); the rig's teardown checks that tmpdir is empty."""
    assert kind(result) == expected_kind, result
    if expected_kind == SUCCESS:
        assert len(result.delivered) == 1, result
        got_message, got_envelope, _ = result.delivered[0]
        if message is not None:
            assert got_message == message, (len(got_message), len(message))
        if envelope is not None:
            assert got_envelope == envelope
    else:
        assert result.delivered == [], result
    if cause is not None:
        assert cause in result.stderr, (cause, result.stderr[-3000:])
