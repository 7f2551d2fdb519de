"""urllib handlers whose timeout is a deadline for the whole request, not for each socket read.

urllib's `timeout` bounds every connect, send and receive separately, so a server that sends one
byte a second holds a request for as long as it likes. Here each socket operation of a request
gets the time left until its deadline (`request.deadline`, a time.monotonic() value) as its
timeout, and one that starts past the deadline raises TimeoutError. The TLS handshake runs inside
the ssl module and keeps the per-operation timeout.
"""
from __future__ import annotations

import http.client
import socket
import ssl
import time
import urllib.request
from functools import partial


class _Deadline:
    deadline = None   # set on the socket once the connection is made

    def _arm(self):
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the request ran past its deadline")
            self.settimeout(left)

    def recv_into(self, *args, **kwargs):
        self._arm()
        return super().recv_into(*args, **kwargs)

    def recv(self, *args, **kwargs):
        self._arm()
        return super().recv(*args, **kwargs)

    def send(self, *args, **kwargs):
        self._arm()
        return super().send(*args, **kwargs)

    def sendall(self, *args, **kwargs):
        self._arm()
        return super().sendall(*args, **kwargs)


class _DeadlineSocket(_Deadline, socket.socket):
    pass


class _DeadlineSSLSocket(_Deadline, ssl.SSLSocket):
    pass


def _left(deadline, timeout):
    return max(min(timeout, deadline - time.monotonic()), 0.001) if deadline is not None else timeout


class _Connection:
    """Mixed into http.client's connections: a socket of ours, carrying the request's deadline."""

    def __init__(self, *args, deadline=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.deadline = deadline
        self._create_connection = self._connect

    def _connect(self, address, timeout, source_address=None):
        sock = socket.create_connection(address, _left(self.deadline, timeout), source_address)
        ours = _DeadlineSocket(fileno=sock.detach())
        ours.settimeout(_left(self.deadline, timeout))
        return ours

    def connect(self):
        super().connect()                   # HTTPS: wraps the socket in TLS (a _DeadlineSSLSocket)
        self.sock.deadline = self.deadline


class _HTTPConnection(_Connection, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_Connection, http.client.HTTPSConnection):
    pass


class DeadlineHTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(partial(_HTTPConnection, deadline=getattr(req, "deadline", None)), req)


class DeadlineHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self):
        context = ssl.create_default_context()
        context.sslsocket_class = _DeadlineSSLSocket
        super().__init__(context=context)

    def https_open(self, req):
        return self.do_open(partial(_HTTPSConnection, deadline=getattr(req, "deadline", None)), req,
                            context=self._context)
