"""Scanner endpoints (unix socket paths, host:port, [v6]:port) and failover between them."""

import socket

from . import EngineError


def parse_endpoint(text, allow_unix=True):
    """"/path/to/sock" -> (AF_UNIX, path); "host:port", "[v6]:port" -> (AF_INET(6), (host, port)).
    ValueError for anything else."""
    text = text.strip()
    if text.startswith("/") and allow_unix:
        return socket.AF_UNIX, text
    host, sep, port = text.rpartition(":")
    family = socket.AF_INET
    if host.startswith("[") and host.endswith("]"):
        host, family = host[1:-1], socket.AF_INET6
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        expected = "/unix/socket/path, host:port or [v6]:port" if allow_unix else "host:port or [v6]:port"
        raise ValueError(f"endpoint {text!r}: expected {expected}")
    return family, (host, int(port))


class Endpoints:
    """A comma-separated list of endpoints, tried in order until one completes."""

    def __init__(self, engine_name, spec, connect_timeout, timeout, allow_unix=True):
        self.engine_name = engine_name
        self.addresses = [parse_endpoint(e, allow_unix) for e in spec.split(",") if e.strip()]
        if not self.addresses:
            raise ValueError(f"{engine_name}: no endpoint given")
        self.connect_timeout = connect_timeout
        self.timeout = timeout

    def ask(self, conversation):
        """conversation(sock, is_unix) on the first endpoint that completes it. Any
        failure (refused, timeout, reset, an error reply) moves on to the next one;
        EngineError naming every endpoint's problem when none succeeded."""
        problems = []
        for family, address in self.addresses:
            where = address if family == socket.AF_UNIX else f"{address[0]}:{address[1]}"
            try:
                with socket.socket(family, socket.SOCK_STREAM) as sock:
                    sock.settimeout(self.connect_timeout)
                    sock.connect(address)
                    sock.settimeout(self.timeout)
                    return conversation(sock, family == socket.AF_UNIX)
            except EngineError as e:
                problems.append(f"{where}: {e}")
            except socket.timeout:
                problems.append(f"{where}: timed out")
            except OSError as e:
                problems.append(f"{where}: {e.strerror or e}")
        raise EngineError(f"{self.engine_name}: " + "; ".join(problems))
