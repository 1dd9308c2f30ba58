"""Faults in a real trainer's weight serving, injected from outside its code.

* :func:`corrupt_chunks` ``(n)``: the first chunk of each of the first ``n`` weight streams
  (``WeightPublisher.chunks``) has its first byte flipped; its crc32 stays the true one.
* :func:`break_stream` ``(after)``: the first ``StreamWeights`` call that has more than ``after``
  chunks to send is aborted with UNAVAILABLE after sending ``after`` of them.
* :func:`corrupt_buckets` ``(n)``: the first ``n`` buckets the broadcast hub sends
  (``BroadcastHub._part``, the bucket's first part) have their first byte flipped after their true
  crc32 is taken (in the hub's buffer: a part that is a view of the weights is copied there first).

They prove that workers detect damaged bytes and resume broken streams. In a test, each is a
context manager yielding its :class:`~dcmdp_testing.faults.Fault` (``struck`` counts the hits);
the gRPC ones must be in place before ``start_server`` binds the service. As a process::

    python -m dcmdp_testing.trainer_faults [--corrupt-chunks N] [--break-stream N]
        [--corrupt-buckets N] -- TRAINER_ARGS

runs ``python -m dcmdp_trainer TRAINER_ARGS`` with those faults in place.
"""

from __future__ import annotations

import argparse
import dataclasses
from contextlib import ExitStack, contextmanager
from typing import Iterator, Optional

import grpc
import torch

from dcmdp_testing.faults import Fault, patched, run_module
from dcmdp_trainer.broadcast import BroadcastHub
from dcmdp_trainer.server import TrainerService
from dcmdp_trainer.weights import WeightPublisher


@contextmanager
def corrupt_chunks(times: int) -> Iterator[Fault]:
    fault = Fault(times)
    real = WeightPublisher.chunks

    def chunks(self, *args, **kwargs):
        for n, chunk in enumerate(real(self, *args, **kwargs)):
            if n == 0 and fault.strike():
                chunk = dataclasses.replace(chunk, data=bytes([chunk.data[0] ^ 0xFF]) + chunk.data[1:])
            yield chunk

    with patched(WeightPublisher, "chunks", chunks):
        yield fault


@contextmanager
def break_stream(after: int, times: int = 1) -> Iterator[Fault]:
    fault = Fault(times)
    real = TrainerService.StreamWeights

    def StreamWeights(self, request, context):
        stream = real(self, request, context)
        try:
            for n, message in enumerate(stream):
                if n == after and fault.strike():
                    context.abort(grpc.StatusCode.UNAVAILABLE, f"test fault: stream broken after {n} chunks")
                yield message
        finally:
            stream.close()  # the real handler's cleanup (stream slot, watchdog) runs now

    with patched(TrainerService, "StreamWeights", StreamWeights):
        yield fault


@contextmanager
def corrupt_buckets(times: int) -> Iterator[Fault]:
    fault = Fault(times)
    real = BroadcastHub._part

    def _part(self, prep, i, lo, hi, buffer):
        data = real(self, prep, i, lo, hi, buffer)
        if lo == prep.layout.span(i)[0] and fault.strike():
            self.publisher.bucket(prep, i, torch.empty(prep.layout.bucket_bytes, dtype=torch.uint8))  # true crc, kept
            out = buffer()  # (the buffer a cast part is in already)
            if data.untyped_storage().data_ptr() != out.untyped_storage().data_ptr():  # a view of the weights
                data = out[:hi - lo].copy_(data)
            data[0] = data[0] ^ 0xFF
        return data

    with patched(BroadcastHub, "_part", _part):
        yield fault


def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m dcmdp_testing.trainer_faults",
                                 description="run dcmdp_trainer with faults in its weight serving")
    ap.add_argument("--corrupt-chunks", type=int, default=0, metavar="N")
    ap.add_argument("--break-stream", type=int, default=None, metavar="N", help="after N chunks")
    ap.add_argument("--corrupt-buckets", type=int, default=0, metavar="N")
    ap.add_argument("args", nargs=argparse.REMAINDER, help="-- then the trainer's arguments")
    ns = ap.parse_args(argv)
    with ExitStack() as faults:
        if ns.corrupt_chunks:
            faults.enter_context(corrupt_chunks(ns.corrupt_chunks))
        if ns.break_stream is not None:
            faults.enter_context(break_stream(ns.break_stream))
        if ns.corrupt_buckets:
            faults.enter_context(corrupt_buckets(ns.corrupt_buckets))
        run_module("dcmdp_trainer", ns.args)


if __name__ == "__main__":
    main()
