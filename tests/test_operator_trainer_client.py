"""The operator's GetStatus client against a real gRPC server built from dcmdp.proto."""

from __future__ import annotations

import asyncio
import socket
import time

from dcmdp_operator import trainer_client
from certs import self_signed
from operator_helpers import FakeTrainer

STATUS = {
    "run_name": "r", "phase": "Running", "step": 7, "total_steps": 50, "weight_version": 7, "reward_mean": 0.25,
    "prob_diff_mean": 0.0031, "run_lambda": 0.5, "checkpoint_step": 5, "updated_unix_ms": 1_700_000_000_000,
    "pools": [{"name": "bf16", "prob_diff_mean": 0.0031, "lambda": 0.5, "tolerance": 0.003, "tokens": 1234, "workers": 2}],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_reads_the_status_with_the_token_and_is_refused_without_it():
    with FakeTrainer() as trainer:
        trainer.statuses["tok"] = STATUS
        target = f"127.0.0.1:{trainer.port}"
        st, err = asyncio.run(trainer_client.get_status(target, "tok", 5))
        assert err is None
        assert (st["step"], st["total_steps"], st["phase"], st["checkpoint_step"]) == (7, 50, "Running", 5)
        assert abs(st["prob_diff_mean"] - 0.0031) < 1e-12 and st["run_lambda"] == 0.5
        # not reported (here: c while `auto` calibrates, no evaluation yet): None, not 0
        assert st["tolerance"] is None and st["eval_accuracy"] is None
        assert isinstance(st["updated_unix_ms"], int)
        assert st["pools"] == [{"name": "bf16", "prob_diff_mean": 0.0031, "lambda": 0.5, "tolerance": 0.003,
                                "tokens": 1234, "workers": 2, "reward_mean": None, "version_lag_mean": 0.0,
                                "rollouts_dropped_stale": 0}]
        st, err = asyncio.run(trainer_client.get_status(target, "wrong", 5))
        assert st is None and "UNAUTHENTICATED" in err and target in err
        assert trainer.rejected == 1


def test_a_trainer_that_is_down_or_slow_is_reported_not_raised():
    t0 = time.monotonic()
    st, err = asyncio.run(trainer_client.get_status(f"127.0.0.1:{free_port()}", "tok", 2))
    assert st is None and "UNAVAILABLE" in err
    assert time.monotonic() - t0 < 2.5
    with FakeTrainer() as trainer:
        trainer.statuses["tok"] = STATUS
        trainer.delay = 1.0
        st, err = asyncio.run(trainer_client.get_status(f"127.0.0.1:{trainer.port}", "tok", 0.2))
        assert st is None and "DEADLINE_EXCEEDED" in err


def test_tls_verifies_the_trainer_and_never_falls_back_to_plaintext(tmp_path):
    cert, key = self_signed(tmp_path / "a", ("r-trainer-0.r-trainer",))
    other, _ = self_signed(tmp_path / "b", ("r-trainer-0.r-trainer",))
    with FakeTrainer(tls=(cert.read_bytes(), key.read_bytes())) as trainer:
        trainer.statuses["tok"] = STATUS
        target = f"127.0.0.1:{trainer.port}"
        st, err = asyncio.run(trainer_client.get_status(target, "tok", 5, tls_ca=cert.read_bytes(),
                                                        server_name="r-trainer-0.r-trainer"))
        assert err is None and st["step"] == 7
        # plaintext to a TLS port, another CA, another name: no status, the reason named
        for kwargs in ({}, {"tls_ca": other.read_bytes(), "server_name": "r-trainer-0.r-trainer"},
                       {"tls_ca": cert.read_bytes(), "server_name": "evil"}):
            st, err = asyncio.run(trainer_client.get_status(target, "tok", 2, **kwargs))
            assert st is None and "UNAVAILABLE" in err, (kwargs, err)
        assert trainer.calls == 1
