"""The collective data plane: a stateless torch.distributed group per weight broadcast.

Like vLLM's ``StatelessProcessGroup`` for weight updates, the group lives outside torch's global
``init_process_group`` state: a ``ProcessGroupGloo`` (CPU) or ``ProcessGroupNCCL`` (CUDA) built
directly on the trainer's ``TCPStore`` under a secret, per-broadcast ``PrefixStore`` name. The
trainer is rank 0; the workers that joined (through the authenticated ``JoinBroadcast`` RPC, the
only place the name is handed out) are ranks 1..n-1. A new group per broadcast lets workers join
and leave between versions without a global re-initialisation.

The store does no authentication: a peer without the run token can reach the port but never
learns the group name, so it cannot rendezvous with a broadcast (see docs/runtime.md).
"""

from __future__ import annotations

import atexit
import datetime
import os
import socket
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # optional and heavy (the ml extra): the core imports without it
    import torch
    import torch.distributed as dist


# TCP connections (gloo "devices", each with its own I/O loop) per pair of ranks; gloo spreads
# consecutive operations over them. One connection moved 2.4-3.0 GiB/s of 2-8 MiB broadcasts on
# idle loopback, four 3.6-4.8 (raw TCP: 5.7). Every rank of a group must use the same number.
GLOO_CONNECTIONS = int(os.environ.get("DCMDP_GLOO_CONNECTIONS", "4"))
GLOO_THREADS = int(os.environ.get("DCMDP_GLOO_THREADS", "4"))


def local_address_towards(host: str) -> str:
    """The local IP address this machine uses to reach ``host`` (no packet is sent)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, 9))
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


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


_releasing: list[threading.Thread] = []  # teardowns under way (joined by wait_released)
_releasing_lock = threading.Lock()


def release_group(pg) -> None:
    """Abort ``pg`` now (peers blocked in it fail at once) and drop the caller's reference to it in
    a thread of its own: the teardown joins gloo's I/O threads, 20-40 ms on loopback that the
    caller need not wait for. The caller must hold no other reference. :func:`wait_released`
    (also run at exit: a group destroyed while the interpreter shuts down aborts the process)
    waits for every teardown."""
    close_group(pg)
    holder = [pg]
    del pg
    t = threading.Thread(target=holder.clear, name="dcmdp-group-release", daemon=True)
    with _releasing_lock:
        _releasing[:] = [x for x in _releasing if x.is_alive()] + [t]
    t.start()


@atexit.register
def wait_released() -> None:
    """Return once every group handed to :func:`release_group` is torn down."""
    with _releasing_lock:
        pending = list(_releasing)
    for t in pending:
        t.join()
