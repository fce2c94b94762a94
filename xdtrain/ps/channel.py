"""A direct request channel between a PS client and a shard actor on the same node.

A Ray actor call costs ~1.5-2 ms round trip on the 2-core dev box (task submission, the raylet,
the core worker's threads), more than gathering 32k rows. For a shard on its own node the client
instead talks to the actor process over a Unix socket (Linux abstract namespace, so no file is
left behind): ~0.05 ms round trip. Ray still starts, places, restarts and controls the actor;
the socket carries only the data calls (pull, push and their shared-memory forms).

Frames: a 4-byte little-endian length, a JSON header, then the raw bytes of any numpy arrays the
header names (arguments are JSON scalars/strings or arrays; nothing is unpickled). The first
frame on a connection must carry the token the actor handed out through an (authenticated) Ray
call, within HELLO_TIMEOUT_S, from a process of the actor's own uid (SO_PEERCRED): an abstract
socket has no file permissions, so any local user could otherwise connect and hold a thread.
Requests on one connection are served in order; responses come back in the same order.

A client is single-threaded: it may have many requests in flight, and reads their responses in
order (`Ticket.result()`). A closed or broken connection fails every pending ticket with
`ChannelClosed`, which the PS client treats like a lost actor (recovery, then replay/resend).
"""

from __future__ import annotations

import hmac
import json
import os
import secrets
import select
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable

import numpy as np

_LEN = struct.Struct("<I")
_MAX_HEADER = 1 << 20


class ChannelClosed(ConnectionError):
    """The connection to a shard broke (its process died, or the shard closed it)."""


class RemoteError(RuntimeError):
    """An error raised by the shard whose type the client does not map to a local class."""


def available() -> bool:
    """Abstract-namespace Unix sockets are Linux-only."""
    return hasattr(socket, "AF_UNIX") and os.uname().sysname == "Linux"


# ---- framing ------------------------------------------------------------------------------------
def _encode(obj, arrays: list[np.ndarray]):
    if isinstance(obj, np.ndarray):
        arrays.append(np.ascontiguousarray(obj))
        return {"$": len(arrays) - 1}
    if isinstance(obj, list | tuple):
        return [_encode(x, arrays) for x in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    return obj


def _decode(obj, arrays: list[np.ndarray]):
    if isinstance(obj, dict) and "$" in obj:
        return arrays[obj["$"]]
    if isinstance(obj, list):
        return [_decode(x, arrays) for x in obj]
    return obj


def _pack(header: dict, body=None) -> list:
    arrays: list[np.ndarray] = []
    header = {**header, "b": _encode(body, arrays)}
    header["x"] = [[a.dtype.str, list(a.shape)] for a in arrays]
    raw = json.dumps(header, separators=(",", ":")).encode()
    return [_LEN.pack(len(raw)) + raw] + [memoryview(a).cast("B") for a in arrays if a.nbytes]


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    while len(view):
        n = sock.recv_into(view)
        if n == 0:
            raise ChannelClosed("connection closed")
        view = view[n:]


def _read_frame(
    sock: socket.socket, max_header: int = _MAX_HEADER, arrays_ok: bool = True
) -> tuple[dict, object]:
    head = bytearray(_LEN.size)
    _recv_exact(sock, memoryview(head))
    (n,) = _LEN.unpack(head)
    if n > max_header:
        raise ChannelClosed(f"bad frame header length {n}")
    raw = bytearray(n)
    _recv_exact(sock, memoryview(raw))
    header = json.loads(raw)
    if not isinstance(header, dict) or (header.get("x") and not arrays_ok):
        raise ChannelClosed("unexpected frame")
    arrays = []
    for dtype, shape in header.get("x", []):
        dtype = np.dtype(dtype)
        if dtype.kind not in "biuf":  # plain numbers only: never object pointers from a socket
            raise ChannelClosed(f"unexpected array dtype {dtype}")
        a = np.empty(shape, dtype=dtype)
        if a.nbytes:
            _recv_exact(sock, memoryview(a).cast("B"))
        arrays.append(a)
    return header, _decode(header.get("b"), arrays)


def _advance(views: list[memoryview], sent: int) -> None:
    """Drop the first `sent` bytes of a list of buffers being sent."""
    while sent and views:
        if sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        else:
            views[0] = views[0][sent:]
            sent = 0


def _send_all(sock: socket.socket, parts: list) -> None:
    views = [memoryview(p).cast("B") for p in parts]
    while views:
        _advance(views, sock.sendmsg(views))


# ---- the actor's side ---------------------------------------------------------------------------
HELLO_TIMEOUT_S = 10.0  # how long a new connection may take to present its token


def peer_uid(conn: socket.socket) -> int:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED: pid, uid, gid)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1]


class ChannelServer:
    """Listens on an abstract Unix socket; each connection is served by its own thread.

    `handler(method, incarnation, version, args)` runs one request (the actor serialises it with
    its Ray calls); its exceptions go back to the client by class name and message.
    """

    def __init__(self, handler: Callable, allowed: frozenset[str]) -> None:
        self._handler = handler
        self._allowed = allowed
        self.token = secrets.token_hex(16)
        self.address = f"\0xdps-{os.getpid()}-{secrets.token_hex(8)}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(self.address)
        self._sock.listen(64)
        threading.Thread(target=self._accept_loop, name="ps-channel", daemon=True).start()

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="ps-channel-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                if peer_uid(conn) != os.getuid():  # an abstract socket has no file permissions to rely on
                    return
                conn.settimeout(HELLO_TIMEOUT_S)  # a silent connection must not hold a thread for ever
                hello, _ = _read_frame(conn, max_header=1024, arrays_ok=False)  # nothing big before auth
                if not hmac.compare_digest(str(hello.get("token", "")), self.token):
                    return
                conn.settimeout(None)
                while True:
                    req, args = _read_frame(conn)
                    _send_all(conn, self._run(req, args))
            except (ChannelClosed, OSError, ValueError):
                return  # the client went away (or spoke nonsense): drop the connection

    def _run(self, req: dict, args) -> list:
        method = req.get("m")
        try:
            if method not in self._allowed:
                raise AttributeError(f"method {method!r} is not served over the channel")
            result = self._handler(method, req.get("i"), req.get("v"), args)
            return _pack({}, result)
        except Exception as e:  # noqa: BLE001 - every error goes back to the caller
            return _pack({"err": type(e).__name__, "msg": str(e)})


# ---- the client's side --------------------------------------------------------------------------
class Ticket:
    """A request in flight; `result()` waits for its response (and raises the shard's error)."""

    __slots__ = ("_chan", "done", "value", "error")

    def __init__(self, chan: Channel) -> None:
        self._chan = chan
        self.done = False
        self.value = None
        self.error: BaseException | None = None

    def result(self):
        while not self.done:
            self._chan._read_one()
        if self.error is not None:
            raise self.error
        return self.value

    def poll(self) -> bool:
        """True once the response has arrived (reads whatever responses are ready, never blocks)."""
        if not self.done:
            self._chan.poll()
        return self.done


class Channel:
    """A client's connection to one shard actor."""

    def __init__(self, address: str, token: str, errors: dict[str, type]) -> None:
        self._errors = errors
        self._pending: deque[Ticket] = deque()
        self.closed = False
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.connect(address)
        _send_all(self._sock, _pack({"token": token}))

    def submit(self, method: str, incarnation: str | None, version: int | None, args: tuple) -> Ticket:
        ticket = Ticket(self)
        if self.closed:
            self._fail(ticket)
            return ticket
        parts = _pack({"m": method, "i": incarnation, "v": version}, list(args))
        self._pending.append(ticket)
        try:
            self._send(parts)
        except (OSError, ChannelClosed):
            self._break()
        return ticket

    def _send(self, parts: list) -> None:
        """Send a request; if the socket is full, read responses meanwhile (so neither side can
        block the other: the shard stops reading requests while its responses are unread)."""
        views = [memoryview(p).cast("B") for p in parts]
        while views:
            try:
                sent = self._sock.sendmsg(views, [], socket.MSG_DONTWAIT)
            except BlockingIOError:
                readable, _, _ = select.select([self._sock], [self._sock], [])
                if readable and self._pending:
                    self._read_one()
                continue
            _advance(views, sent)

    def _read_one(self) -> None:
        if self.closed:
            raise ChannelClosed("channel closed")
        try:
            header, body = _read_frame(self._sock)
        except (OSError, ChannelClosed, ValueError):
            self._break()
            return
        ticket = self._pending.popleft()
        if "err" in header:
            cls = self._errors.get(header["err"])
            msg = header.get("msg", "")
            ticket.error = cls(msg) if cls is not None else RemoteError(f"{header['err']}: {msg}")
        else:
            ticket.value = body
        ticket.done = True

    def poll(self) -> None:
        """Read the responses that have already arrived."""
        while self._pending and not self.closed:
            if not select.select([self._sock], [], [], 0)[0]:
                return
            self._read_one()

    def drain(self) -> None:
        """Wait for every pending response (errors stay in their tickets)."""
        while self._pending and not self.closed:
            self._read_one()

    def _fail(self, ticket: Ticket) -> None:
        ticket.error, ticket.done = ChannelClosed("connection to the shard was lost"), True

    def _break(self) -> None:
        self.closed = True
        try:
            self._sock.close()
        except OSError:
            pass
        while self._pending:
            self._fail(self._pending.popleft())

    def close(self) -> None:
        self._break()
