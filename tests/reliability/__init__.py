"""Issue 6: proof that fp-qmail never loses mail (fault matrix, load, fuzzing, setuid
attacks). A package, so its conftest.py does not clash with tests/conftest.py."""
