"""fp-qmail: virus scanning for qmail.

`fpqmail.queue` is the per-message program installed as qmail-queue; the Mail Scanner
daemon it talks to lives in `fpqmail.scand`. Nothing is imported here, so that the
per-message program pays for nothing it does not use.
"""
__version__ = "0.1.0"
