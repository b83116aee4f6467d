# fp-qmail. `make demo` and `make test` do all set-up on a fresh machine (as root).
PYTHON ?= python3

.PHONY: deps test test-py demo build bench install uninstall deb deps-deb test-deb reliability fuzz clean

deps:
	scripts/install-deps

# The whole suite, against the Nuitka binary build/fp-qmail.dist/fp-qmail (what CI runs).
test: deps build
	FPQMAIL_UNDER_TEST=binary $(PYTHON) -m pytest -q

# The whole suite, against fp-qmail run as `python -m fpqmail`.
test-py: deps
	$(PYTHON) -m pytest -q

# The README's first command: the daemon, fp-qmail, a clean and an EICAR message, the
# quarantine (scripts/demo says what it shows). Uses build/fp-qmail.dist/ if built.
demo: deps
	scripts/demo

# fp-qmail's binary, build/fp-qmail.dist/fp-qmail: fpqmail.queue compiled by Nuitka, linked
# with a launcher that starts CPython core-only (build.py says how and why).
build: deps
	$(PYTHON) build.py

# Per-message wall time, CPU time, page faults and peak RSS of fp-qmail, its C anchor and
# the interpreter (bench/bench.py, docs/performance.md): a table, the targets,
# bench/results/*.csv (and a PNG with the plot extra). BENCH=--full for every size,
# concurrency and scanner (~20 min); BENCH="--quick --reference PATH" also measures
# another build of the binary beside this one.
BENCH ?= --quick
bench: build
	$(PYTHON) bench/bench.py $(BENCH)

# ---- issue 6: the proof that no mail is lost (tests/reliability/, as root) -----------
# The whole suite against the binary with the full budgets (2000 messages of load,
# FUZZ_CASES per fuzz target: ~1 h), then the table: fault matrix tried/held, load
# figures, fuzz cases per target, setuid attacks tried/held. `make test` runs the same
# tests with small budgets (200 messages, 300 cases per target).
FUZZ_CASES ?= 100000
reliability: deps build
	FPQMAIL_UNDER_TEST=binary FPQMAIL_RELIABILITY_STRICT=1 FPQMAIL_LOAD_MESSAGES=2000 \
	  FPQMAIL_FUZZ_CASES=$(FUZZ_CASES) FPQMAIL_RELIABILITY_TABLE=build/reliability.txt \
	  $(PYTHON) -m pytest -q
	@echo "the table is also in build/reliability.txt"

# Only the fuzz targets, FUZZ_CASES cases each (100 000: ~40 min).
fuzz: deps
	FPQMAIL_FUZZ_CASES=$(FUZZ_CASES) $(PYTHON) -m pytest -q tests/reliability/test_fuzz.py

# ---- install, uninstall, Debian package (docs/install.md) --------------------------
# make install [DESTDIR=] [PREFIX=/usr/local] [QMAILDIR=/var/qmail], as root after make build:
# the files under PREFIX, /etc/f-prot.conf if absent, the daemon's user and its directory,
# then fp-qmail in place of qmail-queue and /etc/fp-qmail/trusted-uids
# (packaging/install-qmail-queue, which refuses with nothing changed when qmail's tree is
# not as expected).
PREFIX ?= /usr/local
QMAILDIR ?= /var/qmail
UNITDIR ?= $(PREFIX)/lib/systemd/system
SCAND_USER ?= fpscand
QMAILQ_USER ?= qmailq
QMAIL_GROUP ?= qmail
LIBDIR = $(PREFIX)/lib/fp-qmail
INSTALL_ENV = DESTDIR="$(DESTDIR)" PREFIX="$(PREFIX)" UNITDIR="$(UNITDIR)" SCAND_USER="$(SCAND_USER)" QMAILDIR="$(QMAILDIR)" \
  QMAILQ_USER="$(QMAILQ_USER)" QMAIL_GROUP="$(QMAIL_GROUP)"
QQ_BINARY = build/fp-qmail.dist/fp-qmail

install:
	$(INSTALL_ENV) packaging/install-qmail-queue check $(QQ_BINARY)
	$(INSTALL_ENV) packaging/install-files
	id -u $(SCAND_USER) >/dev/null 2>&1 || useradd --system --user-group --no-create-home \
	  --home-dir /var/lib/fp-qmail --shell /usr/sbin/nologin $(SCAND_USER)
	install -d -o $(SCAND_USER) -g $(SCAND_USER) -m 750 "$(DESTDIR)/var/lib/fp-qmail"
	test -e "$(DESTDIR)/etc/f-prot.conf" || install -D -m 644 packaging/f-prot.conf "$(DESTDIR)/etc/f-prot.conf"
	$(INSTALL_ENV) packaging/install-qmail-queue install "$(DESTDIR)$(LIBDIR)/standalone/fp-qmail"

# Puts qmail's qmail-queue back first (its owner and mode too) and removes
# /etc/fp-qmail/trusted-uids; keeps /etc/f-prot.conf if changed, the quarantine
# (/var/lib/fp-qmail) and the daemon's user.
uninstall:
	$(INSTALL_ENV) packaging/install-qmail-queue uninstall
	rm -rf "$(DESTDIR)$(LIBDIR)" "$(DESTDIR)$(PREFIX)/share/fp-qmail"
	rm -f "$(DESTDIR)$(PREFIX)/sbin/fpqmail-scand" "$(DESTDIR)$(PREFIX)/bin/fpqmail-quarantine" \
	  "$(DESTDIR)$(UNITDIR)/fpqmail-scand.service"
	for page in packaging/man/*.[158]; do rm -f "$(DESTDIR)$(PREFIX)/share/man/man$${page##*.}/$${page##*/}"; done
	if cmp -s packaging/f-prot.conf "$(DESTDIR)/etc/f-prot.conf"; then rm -f "$(DESTDIR)/etc/f-prot.conf"; \
	else echo "make uninstall: kept $(DESTDIR)/etc/f-prot.conf"; fi

# Debian's packaging tools (dpkg-deb, lintian, debootstrap for the package test).
deps-deb: deps
	scripts/install-deps-deb

# dist/fp-qmail_<version>_amd64.deb (packaging/deb/build-deb), checked with lintian.
deb: deps-deb build
	packaging/deb/build-deb

# Installs the package into a throwaway Debian root with a stand-in qmail (slow: ~2 min).
test-deb: deb
	$(PYTHON) -m pytest -q -m deb tests/test_deb.py

clean:
	rm -rf build dist .pytest_cache .hypothesis
