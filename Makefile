# fp-qmail. `make demo` and `make test` do all set-up on a fresh machine (as root).
PYTHON ?= python3

.PHONY: deps test test-py demo build bench install uninstall deb reliability fuzz clean

deps:
	scripts/install-deps

# The whole suite, against the Nuitka binary build/fp-qmail.dist/fp-qmail (what CI runs).
test: deps build
	FPQMAIL_UNDER_TEST=binary $(PYTHON) -m pytest -q

# The whole suite, against fp-qmail run as `python -m fpqmail`.
test-py: deps
	$(PYTHON) -m pytest -q

# fp-qmail as a Nuitka standalone binary: build/fp-qmail.dist/ (build.py says how and why).
build: deps
	$(PYTHON) build.py

clean:
	rm -rf build dist .pytest_cache .hypothesis
