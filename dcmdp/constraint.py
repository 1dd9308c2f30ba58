"""The discrepancy constraint of DC-GRPO, in one sitting.

DCMDP (arXiv 2606.08779) treats the train–inference discrepancy as a constrained MDP:

    maximise  J(θ)   subject to   δ̄(θ) ≤ c

For every sampled response token t (prompt and padding masked out):

    p_inf,t   = probability of the sampled token under the rollout engine, recorded at sampling time
    p_train,t = probability of the same token under the trainer's weights (teacher-forced, before
                the update)
    δ_t       = |p_train,t − p_inf,t|,        δ̄ = (1/|T|) Σ_t δ_t      (token mean over the batch)

The Lagrangian  L(θ, λ) = J(θ) − λ (δ̄(θ) − c)  is solved by alternating a primal step on θ (see
``dcmdp.losses``: the penalty or the advantage-shaping form) and a dual step on λ, once per
training step, after the batch's δ̄_k is known:

    dual ascent:  λ_{k+1} = clip(λ_k + η (δ̄_k − c), λ_min, λ_max)

Inside the tolerance region (δ̄ < c) λ decays towards λ_min and the policy explores freely; outside
it λ grows and the policy is pulled back towards the inference engine's distribution.

Beyond the paper:

* **PID Lagrangian** (Stooke, Achiam & Abbeel 2020): with e_k = δ̄_k − c,
      I_{k+1} = clip(I_k + K_i e_k, λ_min, λ_max)          (anti-windup: the integral is clamped)
      D_k     = α D_{k−1} + (1 − α)(e_k − e_{k−1})
      λ_{k+1} = clip(K_p e_k + I_{k+1} + K_d D_k, λ_min, λ_max)
  With K_p = K_d = 0 and K_i = η it is exactly dual ascent; K_p damps the overshoot that pure
  integral control shows when δ̄ reacts to λ with a lag.
* **Automatic tolerance** (``tolerance: auto``): during the first N steps λ stays at λ_0 and δ̄ is
  recorded; then c = factor · mean(δ̄_1..N), logged and frozen.
* **Per-pool constraints**: each rollout pool has its own δ̄, c and λ, applied to the tokens it
  generated (``ConstraintSet``).

The diagnostics logged besides δ̄: the max of δ_t, the mean |log p_train − log p_inf| and the k3
estimator of KL(p_inf ‖ p_train) with r = p_train / p_inf:  k3 = r − 1 − log r  (≥ 0, unbiased
for samples drawn from the inference engine), log r clamped to ±20 (as the losses' default
log-ratio clamp) so that no finite log-probability makes it inf.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

import torch

from dcmdp.spec import ConstraintSpec


# ------------------------------------------------------------------------------- discrepancy
K3_LOG_RATIO_CLAMP = 20.0  # |log r| bound of the k3 diagnostic (the losses' default clamp)


def token_discrepancy(logp_train: torch.Tensor, logp_inf: torch.Tensor) -> torch.Tensor:
    """δ_t = |p_train,t − p_inf,t| from log-probabilities (elementwise)."""
    return (logp_train.exp() - logp_inf.exp()).abs()


def discrepancy_stats(logp_train: torch.Tensor, logp_inf: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Token-mean discrepancy metrics over the masked (response) tokens.

    Returns ``prob_diff_mean`` (δ̄), ``prob_diff_max``, ``logprob_abs_diff_mean`` and ``k3_kl``.
    """
    m = mask.bool()
    n = int(m.sum())
    if n == 0:
        return {"prob_diff_mean": 0.0, "prob_diff_max": 0.0, "logprob_abs_diff_mean": 0.0, "k3_kl": 0.0, "tokens": 0}
    lt, li = logp_train[m].double(), logp_inf[m].double()
    delta = (lt.exp() - li.exp()).abs()
    log_r = lt - li
    log_r_c = log_r.clamp(-K3_LOG_RATIO_CLAMP, K3_LOG_RATIO_CLAMP)
    k3 = log_r_c.exp() - 1 - log_r_c
    return {
        "prob_diff_mean": float(delta.mean()),
        "prob_diff_max": float(delta.max()),
        "logprob_abs_diff_mean": float(log_r.abs().mean()),
        "k3_kl": float(k3.mean()),
        "tokens": n,
    }


# ------------------------------------------------------------------------------- controllers
def dual_ascent_step(lam: float, delta_mean: float, tolerance: float, lr: float, lam_min: float, lam_max: float) -> float:
    """λ_{k+1} = clip(λ_k + η (δ̄_k − c), λ_min, λ_max)."""
    return min(max(lam + lr * (delta_mean - tolerance), lam_min), lam_max)


@dataclass
class Multiplier:
    """One constraint δ̄ ≤ c and its multiplier λ, with its controller and tolerance state.

    ``value`` is the λ to apply in the current step. ``update(δ̄)`` is the dual step after the
    step's δ̄ is known; it returns the new λ (applied in the next step).
    """

    spec: ConstraintSpec
    tolerance_spec: Any = None  # float | "auto" (per-pool override); None = spec.tolerance
    value: float = 0.0
    tolerance: Optional[float] = None  # c; None while `auto` calibrates
    integral: float = 0.0
    last_error: Optional[float] = None
    derivative: float = 0.0
    calibration: list[float] = field(default_factory=list)
    steps: int = 0

    def __post_init__(self) -> None:
        if self.tolerance_spec is None:
            self.tolerance_spec = self.spec.tolerance
        if self.steps == 0:
            self.value = self.spec.lambda_init
            self.integral = self.spec.lambda_init
            self.tolerance = None if self.tolerance_spec == "auto" else float(self.tolerance_spec)

    @property
    def calibrating(self) -> bool:
        return self.tolerance is None

    def update(self, delta_mean: float) -> float:
        s = self.spec
        self.steps += 1
        if self.tolerance is None:  # tolerance: auto — collect, then freeze c
            self.calibration.append(delta_mean)
            if len(self.calibration) >= s.auto.calibration_steps:
                self.tolerance = s.auto.factor * sum(self.calibration) / len(self.calibration)
            return self.value
        if s.controller == "dual-ascent":
            self.value = dual_ascent_step(self.value, delta_mean, self.tolerance, s.lambda_lr, s.lambda_min, s.lambda_max)
            return self.value
        # PID Lagrangian with a clamped integral (anti-windup) and an optionally smoothed derivative.
        err = delta_mean - self.tolerance
        self.integral = min(max(self.integral + s.pid.ki * err, s.lambda_min), s.lambda_max)
        if self.last_error is not None:
            a = s.pid.derivative_smoothing
            self.derivative = a * self.derivative + (1 - a) * (err - self.last_error)
        self.last_error = err
        raw = s.pid.kp * err + self.integral + s.pid.kd * self.derivative
        self.value = min(max(raw, s.lambda_min), s.lambda_max)
        return self.value

    def state_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("spec")
        return d

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, list(v) if k == "calibration" else v)


class ConstraintSet:
    """The run-level multiplier plus one per rollout pool.

    The per-pool multipliers are the ones applied (each to the tokens its pool generated). The
    run-level one tracks the same rule on the whole batch's δ̄ and the run's c; with a single pool
    it is the same multiplier as the pool's (same δ̄, same c, same updates).
    """

    def __init__(self, spec: ConstraintSpec, pool_tolerances: dict[str, Any]):
        self.spec = spec
        self.run = Multiplier(spec)
        self.pools = {name: Multiplier(spec, tol) for name, tol in pool_tolerances.items()}

    def lambdas(self) -> dict[str, float]:
        return {name: m.value for name, m in self.pools.items()}

    def update(self, run_delta: float, pool_deltas: dict[str, float]) -> None:
        """Dual step for every multiplier whose δ̄ was observed this step."""
        self.run.update(run_delta)
        for name, d in pool_deltas.items():
            self.pools[name].update(d)

    def state_dict(self) -> dict[str, Any]:
        return {"run": self.run.state_dict(), "pools": {n: m.state_dict() for n, m in self.pools.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.run.load_state_dict(state["run"])
        for n, s in state["pools"].items():
            if n in self.pools:
                self.pools[n].load_state_dict(s)
