"""The listening sockets of FP_SCAND_LISTEN: unix stream sockets and TCP."""

import os
import socket
import stat

from fpqmail import values


class Listener:
    def __init__(self, sock, endpoint, unix_identity=None):
        self.sock = sock
        self.endpoint = endpoint          # as configured
        self.unix = sock.family == socket.AF_UNIX
        self._identity = unix_identity    # a unix socket's (path, (st_dev, st_ino))

    @property
    def address(self):
        """Where it listens, as a client names it (a TCP port 0 resolved)."""
        return describe(self.sock.getsockname())

    def close(self):
        """Close it; a unix socket's name is removed only if it is still ours."""
        if self._identity:
            path, identity = self._identity
            try:
                st = os.lstat(path)
                if (st.st_dev, st.st_ino) == identity:
                    os.unlink(path)
            except OSError:
                pass
        self.sock.close()


def open_all(settings, backlog):
    """A bound, listening, non-blocking Listener per FP_SCAND_LISTEN endpoint; OSError
    naming the endpoint when one cannot listen (those opened are closed again)."""
    listeners = []
    try:
        for endpoint in settings.listen:
            listeners.append(_listen(endpoint, settings.socket_mode, backlog))
    except OSError:
        for listener in listeners:
            listener.close()
        raise
    return listeners


def _listen(endpoint, socket_mode, backlog):
    family, address = values.endpoint(endpoint, listen=True)
    sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    identity = None
    try:
        if family == socket.AF_UNIX:
            _remove_stale_socket(address)
            sock.bind(address)
            os.chmod(address, socket_mode)
            st = os.lstat(address)
            identity = (address, (st.st_dev, st.st_ino))
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
        sock.listen(backlog)
    except OSError as e:
        sock.close()
        if identity:
            os.unlink(identity[0])
        raise OSError(e.errno, f"cannot listen on {endpoint}: {e.strerror}") from None
    return Listener(sock, endpoint, identity)


def _remove_stale_socket(path):
    """A socket file left by a daemon that died is removed; a live one is an error."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(17, "exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(98, "another daemon is listening there")


def describe(address):
    if isinstance(address, tuple):
        host, port = address[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return address
