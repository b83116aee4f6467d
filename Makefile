# fp-qmail. `make demo` and `make test` do all set-up on a fresh machine (as root).
PYTHON ?= python3

.PHONY: deps test test-py demo build bench install uninstall deb reliability fuzz clean

deps:
	scripts/install-deps

# The whole suite, against fp-qmail run as `python -m fpqmail`.
test: deps
	$(PYTHON) -m pytest -q

clean:
	rm -rf build dist .pytest_cache .hypothesis
