"""Operator settings: read from the environment (the Helm chart sets them), overridable in code.

One object, :data:`CONFIG`, read by the handlers at call time (never cached at import), so a test or
``dcmdp-operator``'s flags can change it before the operator starts.
"""

from __future__ import annotations

import dataclasses
import os

from dcmdp import __version__ as _version
from dcmdp import podsecurity

GRPC_PORT = 50051
METRICS_PORT = 9090
FIELD_MANAGER = "dcmdp-operator"
# Where the trainer's gRPC server is reached by default: pod 0 of the indexed Job, through the
# headless Service (stable DNS name `<pod hostname>.<subdomain>.<namespace>.svc`).
DEFAULT_TRAINER_ADDRESS = "{run}-trainer-0.{run}-trainer.{namespace}.svc:{port}"


def _float(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"environment variable {name}={raw!r} is not a number") from None
    if not value > 0:
        raise ValueError(f"environment variable {name}={raw!r} must be > 0")
    return value


@dataclasses.dataclass
class OperatorConfig:
    trainer_image: str = f"ghcr.io/dcmdp/trainer:{_version}"
    rollout_image: str = f"ghcr.io/dcmdp/rollout:{_version}"
    image_pull_policy: str = "IfNotPresent"
    # How often each run's status is polled from its trainer (and its children re-checked).
    poll_seconds: float = 10.0
    # Deadline of one GetStatus call: a trainer that does not answer in time counts as unreachable.
    grpc_timeout_seconds: float = 2.0
    # Python format string with {run}, {namespace}, {port}: where the operator reaches a trainer.
    # Point it at 127.0.0.1:<port> to run the operator outside the cluster (or in tests).
    trainer_address: str = DEFAULT_TRAINER_ADDRESS
    # Pod-template escalations the cluster admin allows (dcmdp.podsecurity.ESCALATIONS; Helm value
    # podSecurity.allow, environment DCMDP_POD_SECURITY_ALLOW, comma-separated). None by default.
    allow_escalations: frozenset[str] = frozenset()

    @classmethod
    def from_env(cls) -> "OperatorConfig":
        d = cls()
        return cls(
            trainer_image=os.environ.get("DCMDP_TRAINER_IMAGE") or d.trainer_image,
            rollout_image=os.environ.get("DCMDP_ROLLOUT_IMAGE") or d.rollout_image,
            image_pull_policy=os.environ.get("DCMDP_IMAGE_PULL_POLICY") or d.image_pull_policy,
            poll_seconds=_float("DCMDP_POLL_SECONDS", d.poll_seconds),
            grpc_timeout_seconds=_float("DCMDP_GRPC_TIMEOUT_SECONDS", d.grpc_timeout_seconds),
            trainer_address=os.environ.get("DCMDP_TRAINER_ADDRESS") or d.trainer_address,
            allow_escalations=podsecurity.check_allow(
                (a.strip() for a in os.environ.get("DCMDP_POD_SECURITY_ALLOW", "").split(",") if a.strip()),
                "DCMDP_POD_SECURITY_ALLOW",
            ),
        )

    def trainer_target(self, run: str, namespace: str) -> str:
        try:
            return self.trainer_address.format(run=run, namespace=namespace, port=GRPC_PORT)
        except (KeyError, IndexError) as exc:
            raise ValueError(
                f"DCMDP_TRAINER_ADDRESS={self.trainer_address!r}: unknown placeholder {exc} "
                "(use {run}, {namespace}, {port})"
            ) from None


CONFIG = OperatorConfig.from_env()
