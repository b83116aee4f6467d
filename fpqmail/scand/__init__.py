"""fpqmail-scand, the Mail Scanner daemon fp-qmail talks to, and its quarantine tool.

Modules, one job each:
  settings    every daemon setting, its default and meaning (the one place)
  cli         command line: fpqmail-scand
  protocol    the wire protocol (docs/protocol.md): parse requests, format replies
  server      listening socket, workers, queue, time limits, signals
  handler     one request: check and open the files, examine, write fo, reply
  examine     what happens to a message (clean / cleaned / infected); mime: its parts
  engines     the scanning engines (builtin, clamd, fpscand)
  quarantine  the store of originals; quarantine_tool: fpqmail-quarantine
  janitor     removes stale temp files
  log         syslog (facility mail) and stderr
"""
