"""The collective data plane: a stateless torch.distributed group per weight broadcast.

Like vLLM's ``StatelessProcessGroup`` for weight updates, the group lives outside torch's global
``init_process_group`` state: a ``ProcessGroupGloo`` (CPU) or ``ProcessGroupNCCL`` (CUDA) built
directly on the trainer's ``TCPStore`` under a secret, per-broadcast ``PrefixStore`` name. The
trainer is rank 0; the workers that joined (through the authenticated ``JoinBroadcast`` RPC, the
only place the name is handed out) are ranks 1..n-1. A new group per broadcast lets workers join
and leave between versions without a global re-initialisation.

The store does no authentication, and it lists its keys to any client (``TCPStore.list_keys``), so a
peer without the run token can learn a group's name and take a rank in it. It cannot read weights:
each rank's ticket carries a random proof (handed out only by ``JoinBroadcast``), the trainer
gathers every rank's proof before it sends anything, and a missing or wrong one fails the round
(the workers then fetch over the authenticated stream; see docs/runtime.md).
"""

from __future__ import annotations

import atexit
import datetime
import ipaddress
import os
import resource
import socket
import sys
import threading
import time
from typing import TYPE_CHECKING, Callable, Optional
from urllib.parse import unquote

if TYPE_CHECKING:
    # optional and heavy (the ml extra): the core imports without it
    import torch
    import torch.distributed as dist


# TCP connections (gloo "devices", each with its own I/O loop) per pair of ranks; gloo spreads
# consecutive operations over them. One connection moved 2.4-3.0 GiB/s of 2-8 MiB broadcasts on
# idle loopback, four 3.6-4.8 (raw TCP: 5.7). Every rank of a group must use the same number.
GLOO_CONNECTIONS = int(os.environ.get("DCMDP_GLOO_CONNECTIONS", "4"))
GLOO_THREADS = int(os.environ.get("DCMDP_GLOO_THREADS", "4"))


WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})  # "listen on every interface": no address to reach


def local_address_towards(host: str) -> str:
    """The local IP address (IPv4 or IPv6) this machine uses to reach ``host`` (no packet is sent);
    ``127.0.0.1`` when ``host`` does not resolve or no route reaches it. For a wildcard host
    (:data:`WILDCARD_HOSTS`) that is a loopback address, which no other machine can reach: give
    the address of a peer instead."""
    try:
        family, _, _, _, addr = socket.getaddrinfo(host.strip("[]"), 9, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def may_be_local(address: str) -> bool:
    """Whether a peer at ``address`` (its IP address as gRPC saw it; "" unknown) may run on this
    machine: unknown, a loopback address, or one of this machine's own addresses (the route to it
    leaves from it). Another pod on the same node has an address of its own: False."""
    if not address:
        return True
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return False
    if ip.is_loopback:
        return True
    try:
        return ipaddress.ip_address(local_address_towards(str(ip))) == ip
    except ValueError:
        return False


def raise_open_file_limit(want: int = 65536) -> int:
    """Raise this process's soft limit of open files towards ``want`` (never above the hard limit);
    returns the soft limit now. A kept gloo group holds ~18 descriptors on the trainer (four
    connections per worker, their event loops), so the 64 groups it may keep need ~1,200: above
    the soft limit of 1,024 many machines start processes with (containers usually have more)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def peer_address(grpc_peer: str) -> str:
    """The IP address in a gRPC peer string (``context.peer()``: ``ipv4:10.0.0.7:41234``,
    ``ipv6:[fd00::7]:41234``, percent-encoded in some gRPC versions; an IPv4-mapped IPv6 address
    as its IPv4 one); "" for another kind (``unix:``) or a malformed one."""
    kind, _, rest = unquote(grpc_peer).partition(":")
    if kind not in ("ipv4", "ipv6") or ":" not in rest:
        return ""
    address = rest.rsplit(":", 1)[0].strip("[]")
    mapped = address.lower().removeprefix("::ffff:")  # an IPv4 client of a server on [::]: its IPv4 address
    return mapped if mapped != address.lower() and mapped.count(".") == 3 else address


def loopback_for(host: str) -> str:
    """An address of ``host``'s own machine to connect to: ``host`` itself, or for a wildcard
    the loopback address of its family."""
    if host not in WILDCARD_HOSTS:
        return host
    return "::1" if ":" in host else "127.0.0.1"


def listening_socket(host: str) -> socket.socket:
    """A TCP socket listening on ``host`` (an address or name, IPv4 or IPv6) at a free port.

    Raises OSError when ``host`` does not resolve or cannot be bound."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM,
                                                      flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.bind(addr[:2] if family == socket.AF_INET else addr)
        sock.listen(socket.SOMAXCONN)
    except OSError:
        sock.close()
        raise
    return sock


def master_store(host: str, timeout_s: float) -> "dist.TCPStore":
    """The trainer's store, listening on ``host`` only, at a free port (``store.port``).

    ``TCPStore(host, 0, is_master=True)`` alone listens on every interface whatever ``host`` is;
    so the listening socket is bound here to ``host`` and handed to the store
    (``master_listen_fd``), which owns and closes it. Raises OSError when ``host`` cannot be bound."""
    # optional and heavy (the ml extra): the core imports without it
    from torch.distributed import TCPStore

    sock = listening_socket(host)
    port, fd = sock.getsockname()[1], sock.detach()
    try:
        return TCPStore(host, port, is_master=True, wait_for_workers=False,
                        timeout=datetime.timedelta(seconds=timeout_s), master_listen_fd=fd, use_libuv=True)
    except BaseException:
        socket.close(fd)
        raise


def client_store(host: str, port: int, timeout_s: float) -> "dist.TCPStore":
    # optional and heavy (the ml extra): the core imports without it
    from torch.distributed import TCPStore

    return TCPStore(host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s))


def open_group(store: "dist.Store", group: str, rank: int, world_size: int, *, join_timeout_s: float,
               backend: str = "gloo", peer_host: str = "127.0.0.1"):
    """A process group of ``world_size`` ranks rendezvousing under ``group`` in ``store``.

    ``backend`` is ``gloo`` (tensors on the CPU) or ``nccl`` (tensors on this process's CUDA
    device); gloo binds to the interface that reaches ``peer_host``. Blocks until every rank has
    connected, or raises (``torch.distributed.DistStoreError``, a RuntimeError) after
    ``join_timeout_s`` seconds: a ticket holder that never connects fails the group then, not at
    the data timeout. Give every operation its own timeout (:func:`broadcast`)."""
    # optional and heavy (the ml extra): the core imports without it
    import torch.distributed as dist

    prefixed = dist.PrefixStore(group + "/", store)
    timeout = datetime.timedelta(seconds=join_timeout_s)  # gloo's rendezvous waits this long
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        address = local_address_towards(peer_host)
        opts._devices = [dist.ProcessGroupGloo.create_device(hostname=address) for _ in range(GLOO_CONNECTIONS)]
        opts._threads = GLOO_THREADS
        return dist.ProcessGroupGloo(prefixed, rank, world_size, opts)
    if backend == "nccl":
        opts = dist.ProcessGroupNCCL.Options()
        opts._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, world_size, opts)
    raise ValueError(f"data plane backend must be gloo or nccl (got {backend!r})")


def broadcast(pg, tensor: "torch.Tensor", timeout_s: float, root: int = 0):
    """``pg.broadcast`` of ``tensor`` from ``root``, asynchronous (returns the Work), failing
    after ``timeout_s`` seconds (a peer that died or stalls)."""
    # optional and heavy (the ml extra): the core imports without it
    import torch.distributed as dist

    opts = dist.BroadcastOptions()
    opts.rootRank, opts.rootTensor = root, 0
    opts.timeout = datetime.timedelta(seconds=timeout_s)
    return pg.broadcast([tensor], opts)


PROOF_BYTES = 16  # a ticket's proof (see :func:`gather`): 128 random bits, two int64 on the wire
# What a rank shows in the proof gather: the proof's two int64, then one of flags.
PROOF_WORDS = PROOF_BYTES // 8 + 1
FLAG_RING = 1  # the rank has mapped the round's shared-memory ring (dcmdp.transport.shared_ring)


def gather(pg, outputs: "list[list[torch.Tensor]]", tensor: "torch.Tensor", timeout_s: float, root: int = 0):
    """``pg.gather`` of every rank's ``tensor`` into ``outputs[0]`` (one tensor per rank) on
    ``root`` (``outputs`` empty elsewhere), asynchronous (returns the Work), failing after
    ``timeout_s`` seconds. The trainer gathers each rank's ticket proof with it."""
    # optional and heavy (the ml extra): the core imports without it
    import torch.distributed as dist

    opts = dist.GatherOptions()
    opts.rootRank = root
    opts.timeout = datetime.timedelta(seconds=timeout_s)
    return pg.gather(outputs, [tensor], opts)


def proof_tensor(proof: bytes, device: str = "cpu", flags: int = 0) -> "torch.Tensor":
    """What a rank contributes to the trainer's proof gather: its ticket's proof as two int64
    (zeros when the ticket has none: it then fails the round, as an impostor would), then
    ``flags`` (:data:`FLAG_RING`); ``PROOF_WORDS`` int64 in all."""
    # optional and heavy (the ml extra): the core imports without it
    import torch

    raw = bytes(proof[:PROOF_BYTES]).ljust(PROOF_BYTES, b"\0") + int(flags).to_bytes(8, sys.byteorder)
    return torch.frombuffer(bytearray(raw), dtype=torch.int64).to(device)


def close_group(pg) -> None:
    """Tear a group down so peers blocked in it fail now rather than at their timeout."""
    for how in ("abort", "shutdown"):
        fn = getattr(pg, how, None)
        if fn is not None:
            try:
                fn()
                return
            except Exception:  # noqa: BLE001 - best effort: the group may already be broken
                continue


# Signs of life during a round. gloo does not fail an operation promptly when its peer dies (a send
# to a SIGKILLed worker waits for its timeout), so each worker bumps a counter in the trainer's store
# while it receives, and the trainer aborts the group when one stops moving.
HEARTBEAT_S = 0.5
DEAD_AFTER_S = 5.0


def alive_key(group: str, rank: int) -> str:
    """The store key of ``rank``'s sign of life in ``group`` (a counter)."""
    return f"{group}/alive/{rank}"


def done_key(group: str, rank: int) -> str:
    """The store key ``rank`` sets when it has received every operation of the round."""
    return f"{group}/done/{rank}"


def failed_key(group: str) -> str:
    """The store key the trainer sets when it gives a round of ``group`` up: every rank stops waiting."""
    return f"{group}/failed"


def wait(work, stop: threading.Event, poll_s: float = 0.05) -> None:
    """``work.wait()`` (raising the operation's error), or RuntimeError as soon as ``stop`` is set:
    a gloo operation whose peer died does not end before its timeout, and aborting the group does
    not end it either, so a waiter that knows the round is lost must be able to leave."""
    done = threading.Event()
    work.get_future().add_done_callback(lambda _: done.set())
    while not done.wait(poll_s):
        if stop.is_set():
            raise RuntimeError("the broadcast round was given up (a peer stopped)")
    work.wait()


class Heartbeat:
    """A daemon thread bumping :func:`alive_key` of (``group``, ``rank``) in ``store`` (a client of
    the trainer's store; the worker's kept connection: opening one per round costs a DNS lookup in
    torch's connect, which stalled 5 s in 1-4 % of connects here and got healthy workers declared
    dead) every :data:`HEARTBEAT_S` seconds, until :meth:`close`. Never raises: a store it cannot
    reach ends the thread (the trainer then treats the rank as gone, as it would a dead one)."""

    def __init__(self, store: "dist.Store", group: str, rank: int):
        self._stop = threading.Event()
        self._done = False
        self.failed = threading.Event()  # set when the trainer gave the round up (:func:`failed_key`)
        self._thread = threading.Thread(target=self._run, args=(store, group, rank), name="dcmdp-heartbeat",
                                        daemon=True)
        self._thread.start()

    def _run(self, store: "dist.Store", group: str, rank: int) -> None:
        key, failed = alive_key(group, rank), failed_key(group)
        try:
            while True:
                store.add(key, 1)
                if store.check([failed]):
                    self.failed.set()
                    return
                if self._stop.wait(HEARTBEAT_S):
                    if self._done:
                        store.set(done_key(group, rank), "1")
                    return
        except Exception:  # noqa: BLE001 - the store is gone: the round fails on its own
            return

    def close(self, done: bool = False) -> None:
        """Stop; ``done``: this rank received the whole round (the trainer waits for every rank's).
        Only the first call does anything (and waits up to 5 s for the thread)."""
        if self._stop.is_set():
            return
        self._done = done
        self._stop.set()
        self._thread.join(5.0)


class LifeWatch:
    """The trainer's side: a daemon thread reading the counters of ranks 1..``world``-1 every
    :data:`HEARTBEAT_S` seconds; when one has not moved for ``dead_after_s`` it calls ``on_dead(rank)``
    once and stops. :meth:`give_up` tells every rank to stop waiting (:func:`failed_key`). The
    counters are deleted by :meth:`close`."""

    def __init__(self, store: "dist.Store", group: str, world: int, on_dead, dead_after_s: float = DEAD_AFTER_S):
        self._store, self._group, self._keys = store, group, {r: alive_key(group, r) for r in range(1, world)}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(on_dead, dead_after_s), name="dcmdp-lifewatch",
                                        daemon=True)
        self._thread.start()

    def _run(self, on_dead, dead_after_s: float) -> None:
        now = time.monotonic()
        last = {r: (-1, now) for r in self._keys}
        while not self._stop.wait(HEARTBEAT_S):
            now = time.monotonic()
            done = [r for r in self._keys if self._store.check([done_key(self._group, r)])]
            for r, key in self._keys.items():
                if r in done:  # (received it all: its heartbeat has ended)
                    continue
                try:
                    seen = self._store.add(key, 0)  # (reads the counter; 0 until the rank's first beat)
                except Exception:  # noqa: BLE001 - the store is closing with the hub
                    return
                if seen != last[r][0]:
                    last[r] = (seen, now)
                elif now - last[r][1] > dead_after_s:
                    on_dead(r)
                    return

    def wait_done(self, stop: threading.Event, timeout_s: float) -> None:
        """Return once every rank has received the whole round (:meth:`Heartbeat.close` with
        ``done``): in gloo's tree broadcast a worker may relay to another, so the trainer's last
        send is not the last receive. Raises RuntimeError when ``stop`` is set (a rank died) or
        after ``timeout_s``."""
        keys = [done_key(self._group, r) for r in self._keys]
        deadline = time.monotonic() + timeout_s
        delay = 0.001  # the workers finish within milliseconds of the last send: poll fast, then back off
        while not self._store.check(keys):
            if stop.wait(delay):
                raise RuntimeError("the broadcast round was given up (a peer stopped)")
            delay = min(2 * delay, HEARTBEAT_S / 5)
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers did not finish receiving within {timeout_s:.0f} s of the last send")

    def give_up(self) -> None:
        try:
            self._store.set(failed_key(self._group), "1")
        except Exception:  # noqa: BLE001 - the store is closing with the hub
            pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        for key in [*self._keys.values(), *(done_key(self._group, r) for r in self._keys)]:
            try:
                self._store.delete_key(key)
            except Exception:  # noqa: BLE001 - best effort: the store may be closing
                pass


_releasing: list[threading.Thread] = []  # teardowns under way (joined by wait_released)
_releasing_lock = threading.Lock()


def release_group(holder: list, then: Optional[Callable[[], None]] = None) -> None:
    """Abort the group in ``holder`` (a one-element list holding the caller's only reference to it,
    emptied here) in a thread of its own, which drops the last reference: the teardown joins gloo's
    I/O threads (20-40 ms on loopback), and an abort or destructor of a gloo group whose operation
    waits on a dead peer blocks until that operation's timeout — neither is for the caller to wait
    for. Whichever thread drops the last reference runs the destructor, so the caller must keep no
    other one, not even a local variable (hence the list). ``then`` runs in that thread once the
    group is gone (its errors are ignored). :func:`wait_released` (also run at exit: a group
    destroyed while the interpreter shuts down aborts the process) waits for every teardown."""
    mine = [holder.pop()]
    t = threading.Thread(target=_teardown, args=(mine, then), name="dcmdp-group-release", daemon=True)
    with _releasing_lock:
        _releasing[:] = [x for x in _releasing if x.is_alive()] + [t]
    t.start()


def _teardown(mine: list, then: Optional[Callable[[], None]] = None) -> None:
    if mine[0] is not None:  # (None: only ``then``)
        close_group(mine[0])
    mine.clear()  # (the last reference: the destructor runs here)
    if then is not None:
        try:
            then()
        except Exception:  # noqa: BLE001 - best effort (the store may be closing)
            pass


def delete_group_keys(store: "dist.Store", group: str, keep: tuple[str, ...] = ()) -> int:
    """Delete the keys of ``group`` from the trainer's store (gloo's rendezvous addresses, the
    round keys above), but those in ``keep``, once the group is gone: the store would otherwise
    keep them for the trainer's life, a few per rank for every group ever opened. Returns how many
    were deleted."""
    prefix = group + "/"
    n = 0
    for key in store.list_keys():
        if key.startswith(prefix) and key not in keep:
            n += bool(store.delete_key(key))
    return n


@atexit.register
def wait_released() -> None:
    """Return once every group handed to :func:`release_group` is torn down."""
    with _releasing_lock:
        pending = list(_releasing)
    for t in pending:
        t.join()
