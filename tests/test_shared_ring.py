"""The shared-memory ring of the same-machine data plane: made by the trainer, mapped read-only by
workers that hold its name and nonce, refused otherwise, and deleted when its trainer is gone."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

from dcmdp.transport import shared_ring
from dcmdp.transport.collective import may_be_local
from dcmdp.transport.shared_ring import HEADER, NONCE_BYTES, RingError, SharedRing, remove_orphans


@pytest.fixture
def shm(tmp_path):
    """A directory standing in for /dev/shm (the code is the same; a test leaves nothing behind)."""
    return str(tmp_path)


def test_a_worker_reads_what_the_trainer_wrote_slot_by_slot(shm):
    ring = SharedRing.create(3, 4096, directory=shm)
    seen = SharedRing.attach(ring.name, ring.nonce, 3, 4096, directory=shm)
    try:
        for k in range(3):
            ring.slot(k, 4096).copy_(torch.full((4096,), k + 7, dtype=torch.uint8))
        out = torch.zeros(1000, dtype=torch.uint8)
        seen.copy_out(1, out)
        assert out.tolist() == [8] * 1000
        ring.slot(1, 10).fill_(42)  # the next part in the same slot
        seen.copy_out(1, out[:10])
        assert out[:10].tolist() == [42] * 10 and out[10:].tolist() == [8] * 990
        with pytest.raises(RingError, match="read-only"):
            seen.slot(0, 1)
        with pytest.raises(RingError, match="outside"):
            seen.copy_out(3, out)
        with pytest.raises(RingError, match="outside"):
            ring.slot(0, 4097)
    finally:
        seen.close()
        ring.close()
    assert os.listdir(shm) == []  # the creator's close deletes the name


def test_the_file_is_private_and_sized_up_front(shm):
    ring = SharedRing.create(2, 1 << 20, directory=shm)
    try:
        st = os.stat(os.path.join(shm, ring.name))
        assert st.st_mode & 0o777 == 0o600
        assert st.st_size == HEADER + (2 << 20) and st.st_blocks * 512 >= 2 << 20  # reserved, not sparse
    finally:
        ring.close()


@pytest.mark.parametrize("change", ["nonce", "slots", "bytes", "name", "traversal"])
def test_a_ticket_that_does_not_match_the_ring_maps_nothing(shm, change):
    ring = SharedRing.create(2, 4096, directory=shm)
    name, nonce, slots, size = ring.name, ring.nonce, 2, 4096
    if change == "nonce":
        nonce = bytes(NONCE_BYTES)
    elif change == "slots":
        slots = 3
    elif change == "bytes":
        size = 8192
    elif change == "name":
        name = "dcmdp-ring-" + "0" * 32
    else:
        name = "../" + ring.name
    try:
        with pytest.raises(RingError):
            SharedRing.attach(name, nonce, slots, size, directory=shm)
    finally:
        ring.close()


def test_a_symlink_in_place_of_a_ring_is_not_followed(shm, tmp_path_factory):
    target = tmp_path_factory.mktemp("elsewhere") / "secret"
    target.write_bytes(bytes(HEADER + 2 * 4096))
    name = "dcmdp-ring-" + "a" * 32
    os.symlink(target, os.path.join(shm, name))
    with pytest.raises(RingError, match="no ring"):
        SharedRing.attach(name, bytes(NONCE_BYTES), 2, 4096, directory=shm)
    remove_orphans(shm)
    assert target.exists()  # the cleaner does not follow it either


def test_no_directory_for_rings_is_a_ring_error_not_a_crash(tmp_path):
    with pytest.raises(RingError, match="cannot create"):
        SharedRing.create(2, 4096, directory=str(tmp_path / "missing"))


KILLED_TRAINER = """
import os, signal, sys
from dcmdp.transport.shared_ring import SharedRing
ring = SharedRing.create(2, 4096, directory=sys.argv[1])
print(ring.name, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_killed_trainers_ring_is_deleted_by_the_next_one_a_live_ones_is_kept(shm):
    live = SharedRing.create(2, 4096, directory=shm)
    dead = subprocess.run([sys.executable, "-c", KILLED_TRAINER, shm], capture_output=True, text=True, timeout=60)
    assert dead.returncode == -signal.SIGKILL
    orphan = dead.stdout.strip()
    assert orphan in os.listdir(shm)
    try:
        new = SharedRing.create(2, 4096, directory=shm)  # (every new ring sweeps first)
        assert sorted(os.listdir(shm)) == sorted([live.name, new.name])
        new.close()
    finally:
        live.close()


def test_which_peers_may_be_on_this_machine():
    assert may_be_local("") and may_be_local("127.0.0.1") and may_be_local("::1") and may_be_local("[::1]")
    assert not may_be_local("192.0.2.7")  # TEST-NET-1: never an address of this machine
    assert not may_be_local("not-an-address")


def test_a_ring_whose_name_was_deleted_or_replaced_is_no_longer_intact(shm):
    ring = SharedRing.create(2, 4096, directory=shm)
    try:
        assert ring.intact()
        os.unlink(ring.path)
        assert not ring.intact()
        with open(ring.path, "wb") as f:  # another file by the same name
            f.write(bytes(HEADER + 2 * 4096))
        assert not ring.intact()
    finally:
        ring.close()
    assert os.path.exists(ring.path)  # the file put in its place is not the ring's to delete


def in_thread_with_timeout(fn, timeout_s: float):
    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except Exception as exc:  # noqa: BLE001 - returned to the caller
            out["value"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout_s)
    return t.is_alive(), out.get("value")


@pytest.mark.parametrize("owner", ["mine", "another user"])
def test_a_fifo_or_a_directory_named_like_a_ring_neither_blocks_nor_breaks_ring_creation(shm, owner):
    """An attacker (any user who can write to /dev/shm) planted a FIFO named like a ring: the
    cleaner opened it and blocked for good, and with it every broadcast round of the trainer."""
    fifo = os.path.join(shm, "dcmdp-ring-" + "ab" * 16)
    os.mkfifo(fifo)
    folder = os.path.join(shm, "dcmdp-ring-" + "cd" * 16)
    os.mkdir(folder)
    if owner != "mine":
        if os.geteuid() != 0:
            pytest.skip("making a file of another user needs root")
        os.chown(fifo, 65534, 65534)
    stuck, ring = in_thread_with_timeout(lambda: SharedRing.create(2, 4096, directory=shm), 5.0)
    assert not stuck, "creating a ring blocked on a FIFO"
    assert isinstance(ring, SharedRing), ring
    try:
        assert os.path.exists(fifo) and os.path.isdir(folder)  # neither is a ring: left alone
        stuck, _ = in_thread_with_timeout(lambda: SharedRing.attach(
            os.path.basename(fifo), bytes(NONCE_BYTES), 2, 4096, directory=shm), 5.0)
        assert not stuck
        with pytest.raises(RingError, match="no regular file"):
            SharedRing.attach(os.path.basename(fifo), bytes(NONCE_BYTES), 2, 4096, directory=shm)
    finally:
        ring.close()


def test_a_name_deleted_between_creation_and_lock_is_made_again(shm, monkeypatch):
    """Two trainers of one user making rings at once: one's cleaner may delete the other's new,
    not yet locked file. The creator notices (its name no longer leads to its file) and makes
    another, instead of handing out a ring no worker can map."""
    real = fcntl.flock
    struck = []

    def flock(fd, how):
        if not struck:
            struck.append(fd)
            for name in os.listdir(shm):  # the racing cleaner
                os.unlink(os.path.join(shm, name))
        return real(fd, how)

    monkeypatch.setattr(shared_ring.fcntl, "flock", flock)
    ring = SharedRing.create(2, 4096, directory=shm)
    try:
        assert struck and ring.intact() and os.listdir(shm) == [ring.name]
        SharedRing.attach(ring.name, ring.nonce, 2, 4096, directory=shm).close()
    finally:
        ring.close()


READ_AFTER_CLOSE = """
import sys, torch
from dcmdp.transport.shared_ring import SharedRing
ring = SharedRing.create(2, 1 << 20, directory=sys.argv[1])
view = ring.slot(1, 1 << 20)
view.fill_(7)
ring.close()
other = SharedRing.create(2, 1 << 20, directory=sys.argv[1])  # (mapped anew: never at the view's addresses)
other.slot(1, 1 << 20).fill_(9)
print(int(view.sum()) == 7 << 20, flush=True)
other.close()
"""


def test_a_closed_rings_slots_stay_mapped_while_a_view_of_them_lives(shm):
    """A gloo send still queued from a borrowed ring's slot when the round fails and the ring is
    closed: closing it unmapped the memory under the send (a read then crashed the process, or
    read whatever was mapped there next — a new ring's bytes)."""
    done = subprocess.run([sys.executable, "-c", READ_AFTER_CLOSE, shm], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "True", (done.returncode, done.stderr[-2000:])
    assert os.listdir(shm) == []


def test_a_lock_taken_by_a_racing_cleaner_makes_the_creator_try_a_new_name(shm, monkeypatch):
    real = fcntl.flock
    struck = []

    def flock(fd, how):
        if not struck:
            struck.append(fd)
            raise BlockingIOError("held by another trainer's cleaner")
        return real(fd, how)

    monkeypatch.setattr(shared_ring.fcntl, "flock", flock)
    ring = SharedRing.create(2, 4096, directory=shm)
    try:
        assert struck and ring.intact()
    finally:
        ring.close()
