import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # tests/runs.py and friends

# Tests run their torch work on one thread: deterministic, and no oversubscription when several
# processes share the 2 cores of the CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    try:
        import torch
    except ImportError:  # operator-only installs
        yield
        return
    torch.set_num_threads(1)
    yield


def pytest_sessionfinish(session, exitstatus):
    """A run that collected no test is a failure (exit 1), never pytest's silent exit code 5."""
    if session.testscollected == 0:
        session.exitstatus = 1
        print("\nerror: no tests were collected (check the test paths and -m/-k filters)")
