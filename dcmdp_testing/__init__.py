"""Test tooling: a Kubernetes API emulator (KMock) and an offline emulation of the API server's
admission of a DCMDPRun (``jsonschema``, ``celpy``).

Not part of the ``dcmdp`` distribution: no image installs it (``pyproject.toml`` leaves it out of
the packages, no Dockerfile copies it; ``tests/test_images.py`` checks both). Tests import it
through pytest's ``pythonpath``; ``scripts/emulator.py`` and ``bench/operator_latency.py`` put the
repository root on ``sys.path``.
"""
