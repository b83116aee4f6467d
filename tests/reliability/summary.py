"""The reliability table: what each test stands for, and what `make reliability` prints.

Every test of the suite that proves something of issue 6 carries a marker saying what:
`fault(item)` for an item of the fault matrix (FAULTS, the issue's list in its order),
`attack(name)`, `fuzz(target)` (with its case count in user_properties) or `load`
(with its figures in user_properties). Tests that other files already had (the end
to end tests of tests/test_fpqmail.py and friends) are not rewritten here: ELSEWHERE
maps them to their fault item, so they are run and counted too.

A test "held" when its setup, call and teardown all passed (the rig's teardown checks
that tmpdir is empty). The table also names every fault item no test ran, and every
mapped test that was not found: the run then fails (FPQMAIL_RELIABILITY_STRICT=1, set
by `make reliability`), so a renamed test cannot silently drop out of the proof.
"""
import os
from collections import defaultdict

import pytest

FAULTS = (
    "scanner: refusing", "scanner: not listening", "scanner: accepting, never answering",
    "scanner: closing mid-reply", "scanner: garbage", "scanner: endless reply",
    "scanner: one byte a second", "scanner: clean, fo truncated or missing", "scanner: error",
    "tmpdir: full", "tmpdir: read-only", "tmpdir: missing", "tmpdir: planted fi*/fo* names",
    "queue: missing", "queue: not executable", "queue: exits 53", "queue: exits 71",
    "queue: exits 91", "queue: killed by a signal", "queue: hanging",
    "fp-qmail: SIGTERM", "fp-qmail: SIGHUP", "fp-qmail: SIGALRM", "fp-qmail: SIGKILL, janitor",
    "input: message ends early", "input: envelope without F", "input: envelope without T",
    "input: envelope without final NUL", "input: 1003-byte address", "input: 10 000 recipients",
    "input: empty sender", "input: 0-byte message", "input: 100 MB message",
    "input: NUL bytes and 8-bit", "input: lines of 1 MB",
    "config: unreadable", "config: malformed", "config: huge", "config: values out of range",
    "env: PYTHONDEVMODE=1", "env: PYTHONMALLOC=debug", "env: PYTHONIOENCODING=rot13",
    "env: huge environment", "env: garbage FP_QMAIL_*",
    "fd: 0 a directory", "fd: 1 closed", "fd: 6 a regular file", "fd: ulimit -n 8",
    "fd: ulimit -f tiny",
)
STRICT = bool(os.environ.get("FPQMAIL_RELIABILITY_STRICT"))

# Tests in other files that already prove fault items: "file::function" -> the items,
# or a function of the test's parameters (item.callspec.params) giving them.
_SCANNER_FAILURES = {
    "scanner error": "scanner: error", "reply starts with": "scanner: garbage",
    "without Size": "scanner: garbage", "without Threat": "scanner: garbage",
    "not one header block": "scanner: garbage", "not ASCII": "scanner: garbage",
    "closed the connection mid-reply": "scanner: closing mid-reply",
    "reply longer than": "scanner: endless reply",
    "the scanner announced": "scanner: clean, fo truncated or missing",
    "fo holds 0 bytes": "scanner: clean, fo truncated or missing",
}


def _scanner_failure(params):
    return [item for text, item in _SCANNER_FAILURES.items() if text in params["logged"]]


def _bad_envelope(params):
    data, code = params["env_bytes"], params["code"]
    if code == 11:
        return ["input: 1003-byte address"]
    if not data:
        return ["input: message ends early"]  # no envelope at all: the caller died
    if not data.startswith(b"F"):
        return ["input: envelope without F"]
    return ["input: envelope without T" if code == 91 else "input: envelope without final NUL"]


def _signal(params):
    return ["fp-qmail: " + {1: "SIGHUP", 2: "SIGTERM", 14: "SIGALRM", 15: "SIGTERM"}[int(params["signum"])]]


ELSEWHERE = {
    "test_fpqmail.py::test_scanner_not_listening_is_a_temporary_failure_and_queue_never_runs":
        ["scanner: not listening"],
    "test_fpqmail.py::test_scanner_not_listening_with_fd6_gives_Z_text": ["scanner: not listening"],
    "test_fpqmail.py::test_scanner_that_never_answers_times_out_within_the_setting":
        ["scanner: accepting, never answering"],
    "test_fpqmail.py::test_scanner_answering_one_byte_a_second_times_out": ["scanner: one byte a second"],
    "test_fpqmail.py::test_scanner_failures_are_temporary_and_deliver_nothing": _scanner_failure,
    "test_scand.py::test_engine_down_means_error_reply_and_fp_qmail_tempfails": ["scanner: error"],
    "test_fpqmail.py::test_missing_tmpdir_is_a_write_failure": ["tmpdir: missing"],
    "test_fpqmail.py::test_planted_names_are_never_opened": ["tmpdir: planted fi*/fo* names"],
    "test_fpqmail.py::test_queue_program_missing_is_a_temporary_failure": ["queue: missing"],
    "test_fpqmail.py::test_queue_program_exit_code_is_passed_through":
        lambda params: ["queue: exits %d" % params["code"]],
    "test_fpqmail.py::test_queue_program_killed_is_seen_as_killed": ["queue: killed by a signal"],
    "test_fpqmail.py::test_signal_while_scanning_removes_files_and_exits_temporarily": _signal,
    "test_fpqmail.py::test_bad_envelope_gets_qmail_queues_exit_code_and_is_not_scanned": _bad_envelope,
    "test_fpqmail.py::test_longest_allowed_address_and_empty_sender_pass": ["input: empty sender"],
    "test_fpqmail.py::test_envelope_and_message_of_any_bytes_pass_unchanged":
        ["input: 10 000 recipients", "input: NUL bytes and 8-bit", "input: empty sender"],
    "test_fpqmail.py::test_empty_message_is_scanned_and_delivered": ["input: 0-byte message"],
    "test_fpqmail.py::test_100MB_message_streams_with_bounded_memory": ["input: 100 MB message"],
    "test_fpqmail.py::test_clean_message_is_delivered_byte_identical_with_one_header":
        ["input: NUL bytes and 8-bit"],
    "test_config.py::test_unreadable_config_is_exit_55": ["config: unreadable"],
    "test_config.py::test_lines_it_cannot_parse_are_logged_and_skipped": ["config: malformed"],
    "test_config.py::test_huge_config_is_exit_55": ["config: huge"],
    "test_config.py::test_a_value_that_cannot_be_parsed_is_exit_55_naming_key_and_value":
        ["config: values out of range"],
    "test_config.py::test_unknown_fp_qmail_variables_are_ignored": ["env: garbage FP_QMAIL_*"],
    "test_binary.py::test_python_variables_from_the_caller_never_make_a_silent_success":
        lambda params: ["env: " + params["variable"]] if "env: " + params["variable"] in FAULTS
        else ["env: PYTHON* (other)"],
    "test_fpqmail.py::test_message_fd_a_directory_is_a_read_error": ["fd: 0 a directory"],
    "test_fpqmail.py::test_envelope_fd_closed_is_a_read_error": ["fd: 1 closed"],
    "test_fpqmail.py::test_fd6_open_read_only_counts_as_absent": ["fd: 6 a regular file"],
}
ATTACKS_ELSEWHERE = {
    "test_setuid.py::test_an_untrusted_callers_environment_changes_nothing":
        "an untrusted caller's environment: policy, scanner, log level, group access, queue",
    "test_setuid.py::test_an_untrusted_caller_cannot_open_the_files_to_a_group":
        "an untrusted caller's environment: policy, scanner, log level, group access, queue",
    "test_setuid.py::test_an_untrusted_caller_gets_the_file_read_even_with_a_log_level_in_its_environment":
        "an untrusted caller's environment: policy, scanner, log level, group access, queue",
    "test_setuid.py::test_a_trusted_uid_list_that_root_alone_does_not_control_is_ignored":
        "a trusted-uid list root alone does not control",
    "test_setuid.py::test_a_trusted_callers_environment_still_names_no_file_or_program":
        "a trusted environment names the caller's queue, config, tmpdir, unix scanner",
    "test_setuid.py::test_with_loglevel_in_a_trusted_environment_paths_are_the_builtin_defaults":
        "a trusted environment names the caller's queue, config, tmpdir, unix scanner",
}


def _function_id(nodeid):
    """'tests/test_fpqmail.py::test_x[a]' -> 'test_fpqmail.py::test_x'."""
    path, sep, rest = nodeid.partition("::")
    return path.rsplit("/", 1)[-1] + sep + rest.partition("[")[0]


class Summary:
    def __init__(self, config):
        self.config = config
        self.kind = {}           # nodeid -> ("fault", [items]) | ("attack", name) | ("fuzz", target) | ("load", None)
        self.failed = set()      # nodeids with any phase not passed
        self.ran = set()
        self.properties = {}     # nodeid -> dict(user_properties)
        self.mapped_found = set()

    # ---- what each test stands for ------------------------------------------------------

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items):
        for item in items:
            fault = item.get_closest_marker("fault")
            attack = item.get_closest_marker("attack")
            fuzz = item.get_closest_marker("fuzz")
            if fault:
                self.kind[item.nodeid] = ("fault", list(fault.args))
            elif attack:
                self.kind[item.nodeid] = ("attack", attack.args[0])
            elif fuzz:
                self.kind[item.nodeid] = ("fuzz", fuzz.args[0])
            elif item.get_closest_marker("load"):
                self.kind[item.nodeid] = ("load", None)
            else:
                self._map_elsewhere(item)

    def _map_elsewhere(self, item):
        key = _function_id(item.nodeid)
        if key in ELSEWHERE:
            faults = ELSEWHERE[key]
            if callable(faults):
                faults = faults(item.callspec.params)
            if not faults:
                raise ValueError("summary.py: no fault item for %s" % item.nodeid)
            self.kind[item.nodeid] = ("fault", faults)
        elif key in ATTACKS_ELSEWHERE:
            self.kind[item.nodeid] = ("attack", ATTACKS_ELSEWHERE[key])
        else:
            return
        self.mapped_found.add(key)

    def pytest_runtest_logreport(self, report):
        if report.nodeid not in self.kind:
            return
        self.ran.add(report.nodeid)
        if not report.passed:
            self.failed.add(report.nodeid)
        if report.when == "call":
            self.properties[report.nodeid] = dict(report.user_properties)

    # ---- the table -------------------------------------------------------------------------

    def rows(self):
        faults = defaultdict(lambda: [0, 0])
        attacks = defaultdict(lambda: [0, 0])
        fuzz = defaultdict(lambda: [0, 0, 0])  # tests, held, cases
        load = []
        for nodeid in self.ran:
            what, arg = self.kind[nodeid]
            held = nodeid not in self.failed
            if what == "fault":
                for item in arg:
                    faults[item][0] += 1
                    faults[item][1] += held
            elif what == "attack":
                attacks[arg][0] += 1
                attacks[arg][1] += held
            elif what == "fuzz":
                fuzz[arg][0] += 1
                fuzz[arg][1] += held
                fuzz[arg][2] += self.properties.get(nodeid, {}).get("fuzz_cases", 0)
            else:
                load.append((held, self.properties.get(nodeid, {}).get("load", {})))
        return faults, attacks, fuzz, load

    @pytest.hookimpl(trylast=True)
    def pytest_terminal_summary(self, terminalreporter):
        if not self.ran:
            return
        faults, attacks, fuzz, load = self.rows()
        out = []
        line = out.append
        line("fp-qmail reliability (issue 6), fp-qmail under test: %s"
             % os.environ.get("FPQMAIL_UNDER_TEST", "module"))
        tried = sum(t for t, _ in faults.values())
        held = sum(h for _, h in faults.values())
        untested = [f for f in FAULTS if f not in faults]
        line("")
        line("Fault matrix: %d items, %d cases tried, %d held%s" % (
            len(FAULTS), tried, held, "; %d items not run" % len(untested) if untested else ""))
        if faults or STRICT:
            line("  %-42s %6s %6s" % ("fault", "tried", "held"))
            for item in list(FAULTS) + sorted(set(faults) - set(FAULTS)):
                t, h = faults.get(item, (0, 0))
                line("  %-42s %6d %6d%s" % (item, t, h, "" if t and t == h else
                                             "   <-- NOT HELD" if t else "   <-- NOT RUN"))
        line("")
        line("Load:")
        if not load:
            line("  (not run)")
        for ok, figures in load:
            line("  " + ("held" if ok else "NOT HELD"))
            items = ["%s %s" % (k, v) for k, v in figures.items()]
            for k in range(0, len(items), 4):
                line("    " + ", ".join(items[k:k + 4]))
        line("")
        line("Fuzzing: %d targets, %d cases" % (len(fuzz), sum(c for _, _, c in fuzz.values())))
        line("  %-44s %8s %6s %6s" % ("target", "cases", "tests", "held"))
        for target in sorted(fuzz):
            t, h, cases = fuzz[target]
            line("  %-44s %8d %6d %6d%s" % (target, cases, t, h, "" if t == h else "   <-- NOT HELD"))
        line("")
        tried_a = sum(t for t, _ in attacks.values())
        held_a = sum(h for _, h in attacks.values())
        line("Setuid attacks: %d tried, %d held" % (tried_a, held_a))
        width = max(map(len, attacks), default=0)
        for name in sorted(attacks):
            t, h = attacks[name]
            line("  %-*s %3d %3d%s" % (width, name, t, h, "" if t == h else "   <-- NOT HELD"))
        if STRICT:
            missing = self.missing()
            if missing:
                line("")
                line("Mapped tests not collected (renamed or removed?):")
                out.extend("  " + key for key in missing)
        terminalreporter.write_sep("=", "reliability summary")
        for text in out:
            terminalreporter.write_line(text)
        path = os.environ.get("FPQMAIL_RELIABILITY_TABLE")
        if path:
            with open(path, "w") as f:
                f.write("\n".join(out) + "\n")

    def missing(self):
        return sorted((set(ELSEWHERE) | set(ATTACKS_ELSEWHERE)) - self.mapped_found)

    @pytest.hookimpl(tryfirst=True)
    def pytest_sessionfinish(self, session):
        """Strict (make reliability): a fault item no test ran, or a mapped test that
        was not found, fails the run like a failed test."""
        faults = self.rows()[0]
        if STRICT and session.exitstatus == 0 and (self.missing() or set(FAULTS) - set(faults)):
            session.exitstatus = 1


def pytest_configure(config):
    for marker in ("fault(item, ...): proves these fault-matrix items (issue 6 section 1)",
                   "attack(name): a setuid attack (issue 6 section 4)",
                   "fuzz(target): a fuzz target; records user property fuzz_cases",
                   "load: the load test; records user property load"):
        config.addinivalue_line("markers", marker)
    config.pluginmanager.register(Summary(config), "reliability-summary")
