"""The Session's weight history keeps only what a feature needs (docs/runtime.md, "Trainer memory")."""

import pytest
import torch

from dcmdp_trainer.session import Session
from runs import tiny_run


@pytest.mark.parametrize("algorithm, lag, serve_lags, kept", [
    ({"maxStaleness": 4}, 0, False, 1),  # the gRPC runtime: the publisher keeps what workers fetch
    ({"maxStaleness": 4}, 2, True, 3),  # the in-process runner serves a lag-2 pool from the history
    ({"maxStaleness": 2, "discrepancyReference": "sampled"}, 0, False, 3),  # δ against the sampled version
])
def test_history_keeps_what_a_feature_needs(tmp_path, algorithm, lag, serve_lags, kept):
    run = tiny_run(algorithm=algorithm, rollout={"pools": [{"name": "bf16", "precision": "bf16", "lag": lag}]})
    s = Session(run, tmp_path, threads=1, serve_lags=serve_lags)
    assert s.keep_versions == kept
    for _ in range(5):
        with torch.no_grad():
            next(s.model.parameters()).add_(1.0)
        s.version += 1
        s._publish()
    assert list(s.history) == list(range(6 - kept, 6))
    current = s.weights(5)
    assert all(t.device.type == "cpu" for t in current.values())
    with torch.no_grad():
        next(s.model.parameters()).add_(1.0)  # a snapshot never changes with the live weights
    name = next(iter(s.model.state_dict()))
    assert not torch.equal(current[name], s.model.state_dict()[name])
    assert s.version_for(lag) == 5 - lag
