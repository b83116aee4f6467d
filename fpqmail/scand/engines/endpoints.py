"""Scanner endpoints (unix socket paths, host:port, [v6]:port) and failover between them."""

import socket

from fpqmail import values

from . import EngineError


class Endpoints:
    """A comma-separated list of endpoints, tried in order until one completes."""

    def __init__(self, engine_name, spec, connect_timeout, timeout, allow_unix=True):
        self.engine_name = engine_name
        self.addresses = [(family, address) for family, address, _ in values.endpoints(spec)]
        if not allow_unix and any(family == socket.AF_UNIX for family, _ in self.addresses):
            raise ValueError(f"{engine_name}: endpoints are host:port or [v6]:port")
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
