"""A request's time limit, as seen by the code that does its work.

The daemon answers `ERROR time limit` for a request when its FP_SCAND_TIMEOUT runs out
(server.py); the worker that computes on it must then stop. The handler passes the
request's deadline (a time.monotonic() value) down to examine() and whatever examine
calls; each place that works in a loop calls check(deadline) between steps. TimeLimit
unwinds the worker to the handler, which abandons the request: nothing is written,
nothing kept, and the reply already sent stands.

This module imports nothing of the daemon, so any module may import it without a cycle.
"""

import time


class TimeLimit(Exception):
    """The request's deadline passed: abandon its work."""

    def __str__(self):
        return "time limit"


def check(deadline):
    """Raise TimeLimit when the deadline (time.monotonic(); None: none) has passed."""
    if deadline is not None and time.monotonic() >= deadline:
        raise TimeLimit()


def remaining(deadline, at_most):
    """Seconds left until the deadline, at most at_most (for a socket's timeout);
    raises TimeLimit when none are left."""
    if deadline is None:
        return at_most
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeLimit()
    return min(left, at_most)
