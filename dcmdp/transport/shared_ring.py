"""A ring of weight-part slots in shared memory, for workers on the trainer's own machine.

gloo, the collective engine of the CPU data plane, has no shared-memory transport: a same-machine
broadcast still copies every byte into a socket and out again, twice per worker counting both ends
(NCCL, the GPU engine, switches to its shared-memory and peer-to-peer transports on its own). When
every worker of a broadcast round runs on the trainer's machine (``dcmdp run``: the embedded
default), the trainer instead casts each part of a bucket straight into a slot of this ring, and
the workers copy it out; the ring carries bytes only. Everything else stays on the round's gloo
group: which part is in which slot and when a slot may be written again (one tiny broadcast and
one tiny gather per part), the crc32 of each bucket, the heartbeats, and the failures. Measured
(``bench/weight_sync.py``, docs/benchmarks.md; two workers, 256 MiB of fp32 sent as bf16, on this
project's 2-core machine): 0.93-1.21 of raw TCP through the ring, 0.53-0.58 over gloo.

There is no library for this piece (torch's shared tensors need a parent process or a Unix socket
to pass descriptors; workers here are independent processes that found the trainer over gRPC), so
it is a file in ``/dev/shm``, mapped by both ends, and nothing more.

* The trainer makes the file (:meth:`SharedRing.create`): ``/dev/shm/dcmdp-ring-<32 hex>``, opened with
  ``O_EXCL | O_NOFOLLOW``, mode 0600 (another user cannot open it, so a worker of another user
  uses gloo), its pages reserved with ``posix_fallocate`` (a full ``/dev/shm``, such as a
  container's default 64 MiB, is an ``OSError`` now, not a ``SIGBUS`` at the first write), and 16
  random bytes (the nonce) at its head. It holds an exclusive ``flock`` on it for its life: a ring
  whose lock nobody holds belongs to a trainer that died, and the next ring made on the machine
  deletes it (:func:`remove_orphans`).
* A worker maps it read-only (:meth:`SharedRing.attach`), by the name and nonce its ticket (from the
  authenticated ``JoinBroadcast``) gives, checking the name's form, that it is a regular file of
  its own user of exactly the expected size, and the nonce: a worker on another machine or in
  another container finds no such file (or another one), says so in the round's proof gather, and
  the round goes over gloo. Processes of the trainer's own user are trusted with the ring (as
  they can usually read the trainer's memory): accidental damage to a slot is caught by the crc32,
  computed from the trainer's private memory and sent over gloo, but crc32 is no MAC, and a
  same-user process that means harm can forge a change or truncate the file (``SIGBUS``). Where
  that matters, ``DCMDP_SHARED_MEMORY=0`` turns rings off.
"""

from __future__ import annotations

import fcntl
import hmac
import mmap
import os
import re
import secrets
import stat
import warnings
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    # optional and heavy (the ml extra): the core imports without it
    import torch

__all__ = ["SharedRing", "RingError", "remove_orphans", "rings_enabled", "SHM_DIR"]

SHM_DIR = os.environ.get("DCMDP_SHM_DIR", "/dev/shm")
NAME = re.compile(r"dcmdp-ring-[0-9a-f]{32}")
HEADER = 64  # the nonce, padded: slots start 64-byte aligned
NONCE_BYTES = 16


def rings_enabled() -> bool:
    """Whether this process uses rings: unless the environment says ``DCMDP_SHARED_MEMORY=0``
    (or off, false, no), read by the trainer and by every worker."""
    return os.environ.get("DCMDP_SHARED_MEMORY", "1").lower() not in ("0", "off", "false", "no")


class RingError(OSError):
    """A ring could not be made or attached (the reason in the message): the round uses gloo."""


class SharedRing:
    """``slots`` slots of ``slot_bytes`` each in one shared file, mapped read-write by its creator
    (the trainer) and read-only by the workers that attach it. Not thread-safe (a ring serves one
    broadcast round at a time)."""

    def __init__(self, name: str, nonce: bytes, slots: int, slot_bytes: int, mm: mmap.mmap, fd: Optional[int],
                 owner: bool, identity: tuple[int, int], directory: str = SHM_DIR):
        self.name, self.nonce, self.slots, self.slot_bytes = name, nonce, slots, slot_bytes
        self.path = os.path.join(directory, name)
        self._identity = identity  # (st_dev, st_ino) of the file mapped: what intact() compares the name with
        # optional and heavy (the ml extra): the core imports without it
        import torch

        self._mm: Optional[mmap.mmap] = mm
        self._fd, self.owner = fd, owner
        with warnings.catch_warnings():  # a worker's mapping is read-only: its tensor is only ever read from
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            self._base: Optional["torch.Tensor"] = torch.frombuffer(mm, dtype=torch.uint8)

    @staticmethod
    def size(slots: int, slot_bytes: int) -> int:
        return HEADER + slots * slot_bytes

    @classmethod
    def create(cls, slots: int, slot_bytes: int, directory: str = SHM_DIR) -> "SharedRing":
        """A new ring of ``slots`` x ``slot_bytes`` (a multiple of 64) in ``directory``; raises
        :class:`RingError` when the directory is missing or full (the caller sends over gloo)."""
        if slots < 1 or slot_bytes <= 0 or slot_bytes % HEADER:
            raise ValueError(f"a ring needs slots >= 1 and slot_bytes a positive multiple of {HEADER} "
                             f"(got {slots} x {slot_bytes})")
        remove_orphans(directory)
        size = cls.size(slots, slot_bytes)
        for _ in range(3):  # (a cleaner that deleted the name between its creation and its lock: again)
            name = f"dcmdp-ring-{secrets.token_hex(16)}"
            path = os.path.join(directory, name)
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                raise RingError(f"cannot create a shared-memory ring in {directory}: {exc.strerror}") from None
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held for the ring's life (see remove_orphans)
                except BlockingIOError:  # another creator's cleaner holds it, about to delete it: a new name
                    os.close(fd)
                    continue
                mine = os.fstat(fd)
                if _identity(path) != (mine.st_dev, mine.st_ino):
                    os.close(fd)
                    continue
                os.posix_fallocate(fd, 0, size)
                mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as exc:
                os.close(fd)
                _unlink(path)
                raise RingError(f"cannot make a {size / (1 << 20):.1f} MiB shared-memory ring in {directory}: "
                                f"{exc.strerror or exc}") from None
            nonce = secrets.token_bytes(NONCE_BYTES)
            mm[:NONCE_BYTES] = nonce
            return cls(name, nonce, slots, slot_bytes, mm, fd, owner=True, identity=(mine.st_dev, mine.st_ino),
                       directory=directory)
        raise RingError(f"cannot create a shared-memory ring in {directory}: its name was deleted at once, "
                        "three times (another process cleaning the folder)")

    @classmethod
    def attach(cls, name: str, nonce: bytes, slots: int, slot_bytes: int, directory: str = SHM_DIR) -> "SharedRing":
        """The ring ``name`` made by a trainer on this machine, mapped read-only; raises
        :class:`RingError` saying why when there is none here, or not the one the ticket names."""
        if not NAME.fullmatch(name or ""):
            raise RingError(f"not a ring name: {name[:80]!r}")
        if len(nonce) != NONCE_BYTES or slots < 1 or slot_bytes <= 0:
            raise RingError(f"a ticket's ring needs a {NONCE_BYTES}-byte nonce, slots >= 1 and slot_bytes > 0")
        size = cls.size(slots, slot_bytes)
        fd = _open_own_file(os.path.join(directory, name))
        if fd is None:
            raise RingError(f"no ring {name} here (no regular file of this user by that name): the trainer is on "
                            "another machine, in another container or of another user")
        try:
            st = os.fstat(fd)
            if st.st_size != size:
                raise RingError(f"ring {name} is {st.st_size} bytes, not the {size} its ticket says")
            mm = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        except OSError as exc:
            raise RingError(f"cannot map ring {name}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)  # (the mapping stays)
        if not hmac.compare_digest(mm[:NONCE_BYTES], nonce):
            mm.close()
            raise RingError(f"ring {name} is not the one the ticket names (another nonce)")
        return cls(name, nonce, slots, slot_bytes, mm, None, owner=False, identity=(st.st_dev, st.st_ino),
                   directory=directory)

    def slot(self, k: int, nbytes: int) -> "torch.Tensor":
        """The creator's writable uint8 view of the first ``nbytes`` of slot ``k``."""
        if not self.owner:
            raise RingError("a worker's ring is read-only")
        self._check(k, nbytes)
        start = HEADER + k * self.slot_bytes
        return self._mapped()[start:start + nbytes]

    def copy_out(self, k: int, out: "torch.Tensor") -> None:
        """Copy the first ``out.numel()`` bytes of slot ``k`` into ``out`` (a contiguous uint8 CPU tensor)."""
        n = out.numel()
        self._check(k, n)
        start = HEADER + k * self.slot_bytes
        out.copy_(self._mapped()[start:start + n])

    def _mapped(self) -> "torch.Tensor":
        if self._base is None:
            raise RingError(f"ring {self.name} is closed")
        return self._base

    def _check(self, k: int, nbytes: int) -> None:
        if not 0 <= k < self.slots or not 0 <= nbytes <= self.slot_bytes:
            raise RingError(f"slot {k} / {nbytes} bytes is outside the ring's {self.slots} x {self.slot_bytes}")

    def intact(self) -> bool:
        """The ring's name still leads to it (its creator did not close it, and no cleaner or user
        deleted or replaced it): workers can map it, and a worker's mapping is still in use."""
        return self._base is not None and _identity(self.path) == self._identity

    def close(self) -> None:
        """Let the ring go: for the creator, delete its name and drop the lock. Idempotent. The
        mapping itself goes when the last tensor viewing it does (each holds the ``mmap``): a gloo
        send still queued from a slot of a closed ring reads the ring, never memory mapped anew
        at its addresses; a worker's mapping of it lives until the worker lets it go."""
        if self.owner and self._fd is not None:
            if self.intact():  # (a file put in its place is not ours to delete)
                _unlink(self.path)
            os.close(self._fd)
            self._fd = None
        self._base = None
        self._mm = None  # (not mm.close(): it would unmap under the views still alive)


def remove_orphans(directory: str = SHM_DIR) -> list[str]:
    """Delete the rings in ``directory`` that belong to this user and whose creator's lock nobody
    holds (a trainer killed without closing them); returns their names. A ring being created
    is locked before it is sized, so a cleaner racing its creator at worst deletes a ring before
    any worker attached it, and that round goes over gloo."""
    removed = []
    try:
        names = [n for n in os.listdir(directory) if NAME.fullmatch(n)]
    except OSError:
        return removed
    for name in names:
        path = os.path.join(directory, name)
        fd = _open_own_file(path)
        if fd is None:  # (not a regular file of this user: never opened, so a FIFO cannot block)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:  # locked: its trainer is alive
            continue
        else:
            _unlink(path)
            removed.append(name)
        finally:
            os.close(fd)
    return removed


def _open_own_file(path: str) -> Optional[int]:
    """A read-only descriptor of ``path`` when it is a regular file of this user (checked before
    opening, so a FIFO or device there is never opened, and again on the descriptor), else None."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            return None
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        return None
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        os.close(fd)
        return None
    return fd


def _identity(path: str) -> Optional[tuple[int, int]]:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:  # gone already, or not ours to delete (a directory put in its place)
        pass
