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
