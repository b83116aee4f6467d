"""fpqmail-scand, the Mail Scanner daemon fp-qmail talks to, and its quarantine tool.

Modules, one job each:
  settings    every daemon setting, its default and meaning (the one place)
  cli         command line: fpqmail-scand
  protocol    the wire protocol (docs/protocol.md): parse requests, format replies
  server      the accepting loop and the workers: connections, limits, time limits, signals
  listeners   the listening sockets (unix, TCP)
  connection  one connection: its peer, its request read as it arrives, its reply
  dispatch    the fair queue in front of the workers, the budget of request bytes
  runtime     what requests are served with: settings, engines, stores, clients
  handler     one request in a worker: In and Out, examine, write Out, keep, the reply
  deadline    a request's time limit, checked where work is done
  examine     what happens to a message (clean / cleaned / infected); mime: its parts
  engines     the scanning engines (builtin, clamd, fpscand)
  quarantine  the store of originals; quarantine_tool: fpqmail-quarantine
  janitor     removes stale temp files
  log         syslog (facility mail) and stderr
"""
