"""The typed model of a ``DCMDPRun`` manifest: the single source of truth.

The CRD schema (``crds/``), the Helm values defaults and ``dcmdp run`` are all derived from, or
tested against, these classes. Field names are camelCase in YAML (as Kubernetes users expect) and
snake_case in Python. Every invalid value fails with the field path (``spec.algorithm.clipLow``)
and the reason: see :func:`load_run` and :class:`SpecError`.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, Optional, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic.alias_generators import to_camel

from dcmdp import names, podsecurity
from dcmdp.precision import PoolPrecision, TrainerPrecision
from dcmdp.yamlfile import YAMLFileError, YAMLLoader, read_documents  # noqa: F401 (YAMLLoader: re-exported)

API_GROUP = "dcmdp.io"
API_VERSION = f"{API_GROUP}/v1alpha1"
KIND = "DCMDPRun"
PLURAL = "dcmdpruns"

DNS_LABEL = names.DNS_1123_LABEL
# A dataset verifier: a built-in name or a Python 'module:function' (ASCII, as the CRD's RE2 sees it).
VERIFIER = r"^(exact|numeric|contains|math|[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*)$"
# A tolerance given as a string: a positive decimal number (bounded digits, so it never rounds to 0
# or overflows). The same pattern is in the CRD, so the cluster and `dcmdp run` agree.
POSITIVE_NUMBER = (
    r"^[+]?(0*[1-9][0-9]{0,15}(\.[0-9]{0,16})?|0*\.0{0,16}[1-9][0-9]{0,15})([eE][-+]?[0-9]{1,2})?$"
)

AlgorithmName = Literal["grpo", "tis", "mis", "icepop", "dc-grpo"]
Correction = Literal["tis", "mis", "icepop"]
CorrectionLevel = Literal["token", "sequence", "geometric"]
AdvantageStd = Literal["population", "unbiased", "none"]
LossAggregation = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"]
ConstraintMode = Literal["penalty", "advantage-shaping", "squared-penalty", "k3-penalty", "hinge-penalty",
                         "deployed-penalty"]
ControllerName = Literal["dual-ascent", "pid"]
Device = Literal["auto", "cpu", "cuda"]
EngineName = Literal["hf", "vllm"]


class CelRule(NamedTuple):
    """A cross-field rule of a model, as a CEL expression for the CRD's ``x-kubernetes-validations``.

    Each model's ``CEL`` tuple sits next to the Python validator that enforces the same rule, and
    ``tests/test_crd.py`` checks on generated manifests that the two always agree.
    """

    rule: str  # CEL over ``self`` (the object, camelCase field names, defaults applied)
    message: str
    field_path: Optional[str] = None  # JSON path relative to the object, e.g. ".lambdaInit"
    # A pod-security rule: left out of the CRD when the admin allows this escalation
    # (``dcmdp.podsecurity.ESCALATIONS``; ``python -m dcmdp.crd --allow``).
    escalation: Optional[str] = None


class SpecModel(BaseModel):
    """Base: camelCase aliases, unknown fields rejected (a typo is an error, not a silent default).

    Strict types, as the Kubernetes API server applies them: ``steps: "10"`` or ``suspend: 1`` is
    an error, not a silent coercion (an int is accepted where a number is expected). NaN and
    infinities are rejected (JSON cannot carry them).
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
        strict=True,
        allow_inf_nan=False,
    )

    CEL: ClassVar[tuple[CelRule, ...]] = ()

    @classmethod
    def null_keeping_fields(cls) -> frozenset[str]:
        """Fields where ``null`` is a value of its own: optional, with a default other than None."""
        out = set()
        for name, f in cls.model_fields.items():
            if f.default is not None and not f.is_required() and type(None) in get_args(f.annotation):
                out |= {name, f.alias or name}
        return frozenset(out)

    @model_validator(mode="before")
    @classmethod
    def _null_means_unset(cls, data: Any) -> Any:
        """``field: null`` (or an empty ``field:`` in YAML) means "not set", as in the API server,
        which drops such nulls before applying defaults. Only fields that take ``None`` as a value
        distinct from their default keep it (the CRD marks exactly those ``nullable``)."""
        if isinstance(data, dict):
            keep = cls.null_keeping_fields()
            return {k: v for k, v in data.items() if v is not None or k in keep}
        return data


# --------------------------------------------------------------------------------------- model
class WarmStartSpec(SpecModel):
    """Short supervised warm start on the task's reference answers, so RL starts above zero."""

    steps: Optional[int] = Field(
        None, ge=0, le=100_000,
        description="Supervised steps before RL (0 = none). Unset: 100 for a built-in model, 0 for a loaded "
        "one (model.path / model.name), whose pretrained weights a warm start at this rate would wreck.",
    )
    learning_rate: float = Field(2e-3, gt=0, le=1.0)
    batch_size: int = Field(256, ge=1, le=65_536)


class ModelSpec(SpecModel):
    """The policy: a built-in tiny model built in code, a local Hugging Face folder, or a Hub id."""

    builtin: Optional[Literal["tiny-qwen3", "tiny-qwen3-moe"]] = Field(
        "tiny-qwen3", description="Built-in model built in code (ignored when `path` is set)."
    )
    path: Optional[str] = Field(
        None, description="Local Hugging Face model folder (config, weights, tokenizer)."
    )
    name: Optional[str] = Field(
        None, min_length=1, max_length=200,
        description="Hugging Face Hub id (e.g. Qwen/Qwen3-0.6B), resolved through the huggingface_hub cache "
        "(downloaded there when online). Exclusive with `path`.",
    )
    revision: Optional[str] = Field(None, min_length=1, max_length=200, description="Hub revision of `name`.")
    dtype: TrainerPrecision = Field(
        "fp32", description="dtype of the trainer's weights (a bf16 checkpoint is upcast to fp32 by default)."
    )
    hidden_size: int = Field(128, ge=8, le=65_536)
    intermediate_size: int = Field(256, ge=8, le=262_144)
    num_layers: int = Field(4, ge=1, le=256)
    num_heads: int = Field(4, ge=1, le=256)
    num_kv_heads: int = Field(2, ge=1, le=256)
    head_dim: int = Field(32, ge=32, le=512, description="vLLM's CPU attention needs head_dim >= 32.")
    num_experts: int = Field(8, ge=2, le=512, description="MoE only.")
    num_experts_per_tok: int = Field(2, ge=1, le=64, description="MoE only.")
    warm_start: WarmStartSpec = Field(default_factory=WarmStartSpec)

    CEL = (
        CelRule("self.numHeads % self.numKvHeads == 0", "numHeads must be a multiple of numKvHeads", ".numHeads"),
        CelRule("self.numExpertsPerTok <= self.numExperts", "numExpertsPerTok must be <= numExperts", ".numExpertsPerTok"),
        CelRule("!(has(self.path) && has(self.name))", "set model.path or model.name, not both", ".name"),
        CelRule("!has(self.revision) || has(self.name)", "revision needs model.name (a Hub id)", ".revision"),
    )

    @model_validator(mode="after")
    def _heads(self) -> "ModelSpec":
        if self.num_heads % self.num_kv_heads:
            raise ValueError("numHeads must be a multiple of numKvHeads")
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError("numExpertsPerTok must be <= numExperts")
        if self.path and self.name:
            raise ValueError("set model.path or model.name, not both")
        if self.revision and not self.name:
            raise ValueError("revision needs model.name (a Hub id)")
        return self

    @property
    def loaded(self) -> bool:
        """True for a pretrained model (``path`` or ``name``), False for a built-in one."""
        return bool(self.path or self.name)

    @property
    def warm_start_steps(self) -> int:
        """``warmStart.steps``, or its default: 100 for a built-in model, 0 for a loaded one."""
        if self.warm_start.steps is not None:
            return self.warm_start.steps
        return 0 if self.loaded else 100


# ---------------------------------------------------------------------------------------- task
class DatasetSpec(SpecModel):
    """A JSONL dataset: one object per line with `prompt` and `answer`."""

    path: str = Field(..., min_length=1)
    verifier: str = Field(
        "exact",
        description="exact | numeric | contains | math | a Python 'module:function' taking (response, answer) "
        "-> a finite number (see docs/models-and-tasks.md).",
        json_schema_extra={"pattern": VERIFIER},
    )
    held_out_fraction: float = Field(0.1, gt=0, lt=1)
    invalid_reward: Literal["error", "zero"] = Field(
        "error", description="A verifier returning NaN, inf or a non-number: 'error' stops the run naming the "
        "verifier and prompt; 'zero' scores 0 and counts it (reward/invalid).",
    )

    @field_validator("verifier")
    @classmethod
    def _verifier(cls, v: str) -> str:
        if re.fullmatch(VERIFIER, v):
            return v
        raise ValueError("must be exact, numeric, contains, math or 'module:function'")


class TaskSpec(SpecModel):
    """A verifiable task with exact-match reward."""

    name: Literal["addition", "comparison", "sorting", "jsonl"] = "addition"
    digits: int = Field(2, ge=1, le=12, description="addition/comparison: digits per operand.")
    items: int = Field(4, ge=2, le=16, description="sorting: digits to sort.")
    dataset: Optional[DatasetSpec] = None
    held_out: int = Field(256, ge=1, le=100_000, description="Held-out prompts for evaluation.")
    max_new_tokens: int = Field(0, ge=0, le=4096, description="0 = derived from the task.")
    chat_template: Literal["none", "tokenizer"] = Field(
        "none", description="none: the prompt text as is (after the tokenizer's BOS, if it has one); tokenizer: "
        "the tokenizer's chat template with the prompt as the user message and the generation prompt added.",
    )
    system_prompt: Optional[str] = Field(None, description="System message (chatTemplate: tokenizer only).")
    overlong_prompts: Literal["drop", "refuse"] = Field(
        "drop", description="Prompts whose tokens + maxNewTokens exceed the model's context: drop them (counted, "
        "with a warning naming the first) or refuse the dataset.",
    )

    CEL = (
        CelRule("self.name != 'jsonl' || has(self.dataset)", "task 'jsonl' needs `dataset` (path and verifier)", ".dataset"),
        CelRule("self.name == 'jsonl' || !has(self.dataset)", "`dataset` is only used with name: jsonl", ".dataset"),
        CelRule("!has(self.systemPrompt) || self.chatTemplate == 'tokenizer'", "systemPrompt needs chatTemplate: tokenizer", ".systemPrompt"),
    )

    @model_validator(mode="after")
    def _dataset(self) -> "TaskSpec":
        if self.name == "jsonl" and self.dataset is None:
            raise ValueError("task 'jsonl' needs `dataset` (path and verifier)")
        if self.name != "jsonl" and self.dataset is not None:
            raise ValueError(f"`dataset` is only used with name: jsonl (name is {self.name!r})")
        if self.system_prompt is not None and self.chat_template != "tokenizer":
            raise ValueError("systemPrompt needs chatTemplate: tokenizer")
        return self


# ----------------------------------------------------------------------------------- algorithm
def _tolerance(v: Any) -> Any:
    """c is a number > 0 or the string 'auto' (a positive decimal string is read as a number)."""
    if isinstance(v, bool):
        raise ValueError("must be a number > 0 or 'auto'")
    if isinstance(v, str) and v != "auto":
        if not re.fullmatch(POSITIVE_NUMBER, v):
            raise ValueError("must be a number > 0 or 'auto'")
        v = float(v)
    if isinstance(v, (int, float)) and not v > 0:
        raise ValueError("must be > 0 (or 'auto')")
    return v


class PIDSpec(SpecModel):
    """PID Lagrangian (Stooke et al. 2020): λ = clip(Kp·e + Ki·Σe + Kd·Δe), e = δ̄ − c."""

    kp: float = Field(1.0, ge=0, le=1e6)
    ki: float = Field(1.0, ge=0, le=1e6)
    kd: float = Field(0.0, ge=0, le=1e6)
    derivative_smoothing: float = Field(0.0, ge=0, lt=1, description="EMA weight of the old Δe.")


class AutoToleranceSpec(SpecModel):
    """`tolerance: auto`: c = factor × mean δ̄ of the first `calibrationSteps` steps, then frozen."""

    calibration_steps: int = Field(5, ge=1, le=10_000)
    factor: float = Field(1.0, gt=0, le=1000)


class ConstraintSpec(SpecModel):
    """The discrepancy constraint δ̄ ≤ c and its multiplier λ (used by algorithm dc-grpo)."""

    tolerance: Union[float, Literal["auto"]] = Field(
        0.0037, description="c > 0, or 'auto' (calibrated from the first steps, then frozen)."
    )
    lambda_init: float = Field(0.1, ge=0)
    lambda_lr: float = Field(1.0, gt=0, le=1e6, alias="lambdaLR", description="η of the dual ascent step.")
    lambda_min: float = Field(0.0, ge=0)
    lambda_max: float = Field(1.0, ge=0, le=1e6)
    mode: ConstraintMode = "penalty"
    controller: ControllerName = "dual-ascent"
    pid: PIDSpec = Field(default_factory=PIDSpec)
    auto: AutoToleranceSpec = Field(default_factory=AutoToleranceSpec)

    _tolerance = field_validator("tolerance", mode="before")(classmethod(lambda cls, v: _tolerance(v)))

    CEL = (
        CelRule("self.lambdaMin <= self.lambdaMax", "lambdaMin must be <= lambdaMax", ".lambdaMin"),
        CelRule(
            "self.lambdaMin <= self.lambdaInit && self.lambdaInit <= self.lambdaMax",
            "lambdaInit must lie within [lambdaMin, lambdaMax]",
            ".lambdaInit",
        ),
    )

    @model_validator(mode="after")
    def _bounds(self) -> "ConstraintSpec":
        if not self.lambda_min <= self.lambda_max:
            raise ValueError("lambdaMin must be <= lambdaMax")
        if not self.lambda_min <= self.lambda_init <= self.lambda_max:
            raise ValueError("lambdaInit must lie within [lambdaMin, lambdaMax]")
        return self


Beta = Annotated[float, Field(ge=0, lt=1)]


class AlgorithmSpec(SpecModel):
    """GRPO and its corrections. Defaults follow the DCMDP paper (arXiv 2606.08779)."""

    name: AlgorithmName = "dc-grpo"
    corrections: list[Correction] = Field(
        default_factory=list, description="Passive corrections composed with dc-grpo (e.g. [tis])."
    )
    group_size: int = Field(8, ge=2, le=1024, description="G samples per prompt.")
    prompts_per_step: int = Field(64, ge=1, le=65_536)
    mini_batch_size: int = Field(16, ge=1, le=65_536, description="Prompts per optimizer update.")
    clip_low: float = Field(0.24, gt=0, lt=1)
    clip_high: float = Field(0.24, gt=0, le=10)
    kl_coef: float = Field(0.0, ge=0, le=100, description="KL-to-reference coefficient (0 = none).")
    learning_rate: float = Field(1e-6, gt=0, le=1.0)
    adam_betas: tuple[Beta, Beta] = Field((0.9, 0.95), strict=False)  # a YAML list becomes the tuple
    weight_decay: float = Field(0.0, ge=0, le=1)
    grad_clip: float = Field(1.0, ge=0, le=1e6, description="Global grad-norm clip (0 = off).")
    temperature: float = Field(1.0, gt=0, le=10, description="Sampling temperature.")
    steps: int = Field(100, ge=1, le=10_000_000)
    max_staleness: int = Field(0, ge=0, le=1024, description="Weight versions a rollout may lag (with "
                               "adaptiveStaleness: the ceiling K_max of the adaptive lag).")
    adaptive_staleness: bool = Field(
        False, description="dc-grpo: set the allowed lag each step from the pools' multiplier, "
        "lag = round(maxStaleness·(1 − λ/λmax)) with λ the largest pool λ: the full lag while the constraint is "
        "slack, none once λ reaches λmax (the in-process runner samples at that lag).")
    @field_validator("max_staleness", mode="before")
    @classmethod
    def _max_staleness(cls, v: Any) -> Any:
        if isinstance(v, str) and v.strip().lower() == "auto":
            raise ValueError("'auto' is spelt `adaptiveStaleness: true` with `maxStaleness: K`, the ceiling of the "
                             "lag the multiplier sets (lag = round(K·(1 − λ/λmax))); maxStaleness stays a number")
        return v

    discrepancy_reference: Literal["current", "sampled"] = Field(
        "current",
        description="p_train in δ: 'current' = the trainer's weights at the start of the step (staleness "
        "counts as mismatch); 'sampled' = the weights the rollout was sampled with, where still kept "
        "(only the engine's numerics count).",
    )
    seed: int = Field(0, ge=0, le=2**31 - 1)
    importance_cap: float = Field(2.0, gt=1, le=1e6, description="C of tis/mis.")
    icepop_low: float = Field(0.5, gt=0, lt=1)
    icepop_high: float = Field(5.0, gt=1, le=1e6)
    mis_low: float = Field(
        0.0, ge=0, lt=1, description="L of mis: ratios below L are dropped too (0 = none; verl rejects below 1/C)."
    )
    correction_level: CorrectionLevel = Field(
        "token",
        description="Ratio the corrections use: per token, the sequence's product, or its geometric mean "
        "(shared by the sequence's tokens).",
    )
    advantage_std: AdvantageStd = Field(
        "population",
        description="Group std dividing advantages: population (÷G), unbiased (÷G−1, verl/TRL) or none (Dr. GRPO).",
    )
    loss_aggregation: LossAggregation = Field(
        "token-mean", description="How per-token losses of a mini-batch are reduced (docs/method.md)."
    )
    loss_aggregation_constant: float = Field(
        1.0, gt=0, le=1e6, description="K of seq-mean-token-sum: Σ_i Σ_t ℓ / (N·K) (Dr. GRPO: the max response length)."
    )
    loss_denominator: Literal["all", "kept"] = Field(
        "all", description="Tokens counted by the aggregation: all response tokens, or only those mis/icepop keep (verl)."
    )
    dual_clip: Optional[float] = Field(
        None, gt=1, le=1e6, description="Dual-clip c: a negative-advantage token's loss is capped at c·|A| (null = off)."
    )
    log_ratio_clamp: float = Field(
        20.0, gt=0, le=80, description="K: log-ratios are clamped to ±K before exp (finite in float32 up to ~88)."
    )
    constraint: ConstraintSpec = Field(default_factory=ConstraintSpec)

    CEL = (
        CelRule("self.miniBatchSize <= self.promptsPerStep", "miniBatchSize must be <= promptsPerStep", ".miniBatchSize"),
        CelRule(
            "self.promptsPerStep % self.miniBatchSize == 0",
            "promptsPerStep must be a multiple of miniBatchSize",
            ".promptsPerStep",
        ),
        CelRule(
            "size(self.corrections) == 0 || self.name == 'dc-grpo'",
            "corrections compose with name: dc-grpo only (use name: tis etc. alone)",
            ".corrections",
        ),
        CelRule("self.corrections.all(c, self.corrections.exists_one(d, d == c))", "corrections must not repeat", ".corrections"),
        CelRule("!('tis' in self.corrections && 'mis' in self.corrections)", "corrections tis and mis are alternatives; pick one", ".corrections"),
        CelRule(
            "!self.adaptiveStaleness || (self.name == 'dc-grpo' && self.maxStaleness >= 1)",
            "adaptiveStaleness needs name: dc-grpo (the lag follows its multiplier) and maxStaleness >= 1 (the ceiling)",
            ".adaptiveStaleness",
        ),
    )

    @model_validator(mode="after")
    def _batches(self) -> "AlgorithmSpec":
        if self.mini_batch_size > self.prompts_per_step:
            raise ValueError("miniBatchSize must be <= promptsPerStep")
        if self.prompts_per_step % self.mini_batch_size:
            raise ValueError("promptsPerStep must be a multiple of miniBatchSize")
        if self.corrections and self.name != "dc-grpo":
            raise ValueError("corrections compose with name: dc-grpo only (use name: tis etc. alone)")
        if len(set(self.corrections)) != len(self.corrections):
            raise ValueError("corrections must not repeat")
        if {"tis", "mis"} <= set(self.corrections):
            raise ValueError("corrections tis and mis are alternatives; pick one")
        if self.adaptive_staleness and not (self.name == "dc-grpo" and self.max_staleness >= 1):
            raise ValueError("adaptiveStaleness needs name: dc-grpo (the lag follows its multiplier) and "
                             "maxStaleness >= 1 (the ceiling)")
        return self

    @property
    def uses_constraint(self) -> bool:
        return self.name == "dc-grpo"

    @property
    def active_corrections(self) -> list[str]:
        """Importance corrections applied to the surrogate, whatever the algorithm name."""
        return [self.name] if self.name in ("tis", "mis", "icepop") else list(self.corrections)


# --------------------------------------------------------------------------- pod templates
def _refused(escalation: str, field: str, what: str, rule: str) -> CelRule:
    return CelRule(rule, podsecurity.refusal(escalation, what), f".{field}", escalation)


def _not_true(field: str) -> str:
    return f"!has(self.{field}) || !self.{field}"


def _one_of(field: str, values: Any) -> str:
    return f"!has(self.{field}) || self.{field} in [{', '.join(repr(v) for v in sorted(values))}]"


Obj = Optional[dict[str, Any]]  # a Kubernetes object passed on as written (scheduling, resources…)
Objs = Optional[list[dict[str, Any]]]
Str = Optional[Annotated[str, Field(max_length=4096)]]
Strs = Optional[list[Annotated[str, Field(max_length=4096)]]]


class OpenModel(SpecModel):
    """A part of a pod template: an allow-list (:mod:`dcmdp.podsecurity`). The fields declared here
    are the allowed ones; any other is refused by :func:`dcmdp.podsecurity.violations` (the model
    keeps it so it can name it) and is unknown to the CRD. ``OPEN_WITH``: the escalation that, when
    the cluster admin allows it, lets this object take any field (the CRD then preserves them)."""

    model_config = ConfigDict(**{**SpecModel.model_config, "extra": "allow"})
    OPEN_WITH: ClassVar[str] = "otherFields"


class Profile(OpenModel):
    """A seccomp or AppArmor profile."""

    type: Optional[str] = Field(None, max_length=64)
    localhost_profile: Optional[str] = Field(None, max_length=4096)


class SeccompProfile(Profile):
    CEL = (_refused("unconfined", "type", "seccompProfile other than RuntimeDefault or Localhost",
                    _one_of("type", podsecurity.CONFINED_PROFILES)),)


class AppArmorProfile(Profile):
    CEL = (_refused("unconfined", "type", "appArmorProfile other than RuntimeDefault or Localhost",
                    _one_of("type", podsecurity.CONFINED_PROFILES)),)


class SELinuxOptions(OpenModel):
    user: Optional[str] = Field(None, max_length=256)
    role: Optional[str] = Field(None, max_length=256)
    type: Optional[str] = Field(None, max_length=256)
    level: Optional[str] = Field(None, max_length=256)

    CEL = (
        _refused("unconfined", "user", "seLinuxOptions.user", "!has(self.user) || self.user == ''"),
        _refused("unconfined", "role", "seLinuxOptions.role", "!has(self.role) || self.role == ''"),
        _refused("unconfined", "type", "seLinuxOptions.type other than the container types",
                 _one_of("type", podsecurity.SELINUX_TYPES)),
    )


class WindowsOptions(OpenModel):
    gmsa_credential_spec_name: Optional[str] = Field(None, max_length=256)
    gmsa_credential_spec: Optional[str] = Field(None, max_length=65_536)
    run_as_user_name: Optional[str] = Field(None, max_length=256)
    host_process: Optional[bool] = None

    CEL = (_refused("privileged", "hostProcess", "windowsOptions.hostProcess", _not_true("hostProcess")),)


class Sysctl(OpenModel):
    name: str = Field(..., max_length=256)
    value: str = Field(..., max_length=4096)

    CEL = (_refused("unconfined", "name", "a sysctl outside the safe set", f"self.name in [{', '.join(repr(v) for v in sorted(podsecurity.SAFE_SYSCTLS))}]"),)


class SecurityContext(OpenModel):
    """What the pod and container security contexts share."""

    run_as_user: Optional[int] = None
    run_as_group: Optional[int] = None
    run_as_non_root: Optional[bool] = None
    seccomp_profile: Optional[SeccompProfile] = None
    app_armor_profile: Optional[AppArmorProfile] = None
    se_linux_options: Optional[SELinuxOptions] = Field(None, alias="seLinuxOptions")
    windows_options: Optional[WindowsOptions] = None

    CEL = (
        _refused("runAsRoot", "runAsUser", "runAsUser 0", "!has(self.runAsUser) || self.runAsUser != 0"),
        _refused("runAsRoot", "runAsNonRoot", "runAsNonRoot false", "!has(self.runAsNonRoot) || self.runAsNonRoot"),
    )


class PodSecurityContext(SecurityContext):
    fs_group: Optional[int] = None
    fs_group_change_policy: Optional[str] = Field(None, max_length=64)
    supplemental_groups: Optional[list[int]] = Field(None, max_length=64)
    supplemental_groups_policy: Optional[str] = Field(None, max_length=64)
    se_linux_change_policy: Optional[str] = Field(None, alias="seLinuxChangePolicy", max_length=64)
    sysctls: Optional[list[Sysctl]] = Field(None, max_length=16)


class Capabilities(OpenModel):
    add: Optional[list[Annotated[str, Field(max_length=64)]]] = Field(None, max_length=16)
    drop: Optional[list[Annotated[str, Field(max_length=64)]]] = Field(None, max_length=64)


class ContainerSecurityContext(SecurityContext):
    privileged: Optional[bool] = None
    allow_privilege_escalation: Optional[bool] = None
    capabilities: Optional[Capabilities] = None
    proc_mount: Optional[str] = Field(None, max_length=64)
    read_only_root_filesystem: Optional[bool] = None

    CEL = SecurityContext.CEL + (
        _refused("privileged", "privileged", "privileged", _not_true("privileged")),
        _refused(
            "privileged", "allowPrivilegeEscalation", "allowPrivilegeEscalation true",
            _not_true("allowPrivilegeEscalation"),
        ),
        _refused("privileged", "procMount", "procMount other than Default", _one_of("procMount", ["Default"])),
        _refused(
            "unconfined", "readOnlyRootFilesystem", "readOnlyRootFilesystem false",
            "!has(self.readOnlyRootFilesystem) || self.readOnlyRootFilesystem",
        ),
        _refused(
            "capabilities", "capabilities.add", "adding a capability other than NET_BIND_SERVICE",
            "!has(self.capabilities) || !has(self.capabilities.add) || "
            "self.capabilities.add.all(c, c == 'NET_BIND_SERVICE')",
        ),
    )


class ContainerPort(OpenModel):
    container_port: Optional[int] = None
    name: Optional[str] = Field(None, max_length=15)
    protocol: Optional[str] = Field(None, max_length=8)
    host_port: Optional[int] = None
    host_ip: Optional[str] = Field(None, alias="hostIP", max_length=64)

    CEL = (
        _refused("hostNamespaces", "hostPort", "hostPort", "!has(self.hostPort) || self.hostPort == 0"),
        _refused("hostNamespaces", "hostIP", "hostIP", "!has(self.hostIP) || self.hostIP == ''"),
    )


class VolumeMount(OpenModel):
    name: Optional[str] = Field(None, max_length=253)
    mount_path: Optional[str] = Field(None, max_length=4096)
    sub_path: Optional[str] = Field(None, max_length=4096)
    sub_path_expr: Optional[str] = Field(None, max_length=4096)
    read_only: Optional[bool] = None
    recursive_read_only: Optional[str] = Field(None, max_length=64)
    mount_propagation: Optional[str] = Field(None, max_length=64)

    CEL = (_refused("privileged", "mountPropagation", "mountPropagation Bidirectional",
                    "!has(self.mountPropagation) || self.mountPropagation != 'Bidirectional'"),)


class EnvVarSource(OpenModel):
    field_ref: Obj = None
    resource_field_ref: Obj = None
    config_map_key_ref: Obj = None
    secret_key_ref: Obj = None

    CEL = (_refused("secrets", "secretKeyRef", "secretKeyRef", "!has(self.secretKeyRef)"),)


class EnvVar(OpenModel):
    name: Optional[str] = Field(None, max_length=4096)
    value: Optional[str] = Field(None, max_length=1 << 20)
    value_from: Optional[EnvVarSource] = None


class EnvFromSource(OpenModel):
    prefix: Optional[str] = Field(None, max_length=4096)
    config_map_ref: Obj = None
    secret_ref: Obj = None

    CEL = (_refused("secrets", "secretRef", "envFrom secretRef", "!has(self.secretRef)"),)


class ContainerFields(OpenModel):
    """The main container's fields a short-form template sets at its top."""

    resources: Obj = None

    @field_validator("resources")
    @classmethod
    def _resource_maps(cls, v: Obj) -> Obj:
        """``limits`` and ``requests`` are maps of resource name to quantity, as the API server
        requires (checked here so a wrong shape is an error naming the field, not a crash later)."""
        for key in ("limits", "requests"):
            m = (v or {}).get(key)
            if m is not None and not (isinstance(m, dict) and all(
                    isinstance(q, (str, int, float)) and not isinstance(q, bool) for q in m.values())):
                raise ValueError(f"resources.{key} must be a map of resource name to quantity "
                                 f"(e.g. {{cpu: '2', nvidia.com/gpu: 8}}), got {type(m).__name__}")
        return v
    env: Optional[list[EnvVar]] = Field(None, max_length=256)
    env_from: Optional[list[EnvFromSource]] = Field(None, max_length=16)
    volume_mounts: Optional[list[VolumeMount]] = Field(None, max_length=64)
    image_pull_policy: Optional[str] = Field(None, max_length=64)


class Container(ContainerFields):
    name: Optional[str] = Field(None, max_length=63)
    image: Optional[str] = Field(None, max_length=4096)
    command: Strs = Field(None, max_length=1024)
    args: Strs = Field(None, max_length=1024)
    working_dir: Str = None
    ports: Optional[list[ContainerPort]] = Field(None, max_length=16)
    resize_policy: Objs = Field(None, max_length=16)
    restart_policy: Optional[str] = Field(None, max_length=64)
    security_context: Optional[ContainerSecurityContext] = None


class ProjectedSource(OpenModel):
    OPEN_WITH = "volumes"
    config_map: Obj = None
    downward_api: Obj = Field(None, alias="downwardAPI")
    cluster_trust_bundle: Obj = None
    secret: Obj = None
    service_account_token: Obj = None

    CEL = (
        _refused("secrets", "secret", "a projected secret", "!has(self.secret)"),
        _refused("serviceAccount", "serviceAccountToken", "a projected serviceAccountToken", "!has(self.serviceAccountToken)"),
    )


class ProjectedVolume(OpenModel):
    OPEN_WITH = "volumes"
    sources: Optional[list[ProjectedSource]] = Field(None, max_length=16)
    default_mode: Optional[int] = None


class Volume(OpenModel):
    """A volume of an allowed kind (``podsecurity.VOLUME_KINDS``); ``hostPath`` and ``secret`` are
    declared so their own escalations can refuse them."""

    OPEN_WITH = "volumes"
    name: Optional[str] = Field(None, max_length=63)
    config_map: Obj = None
    downward_api: Obj = Field(None, alias="downwardAPI")
    empty_dir: Obj = None
    ephemeral: Obj = None
    persistent_volume_claim: Obj = None
    projected: Optional[ProjectedVolume] = None
    host_path: Obj = None
    secret: Obj = None

    CEL = (
        _refused("hostPath", "hostPath", "a hostPath volume", "!has(self.hostPath)"),
        _refused("secrets", "secret", "a secret volume", "!has(self.secret)"),
    )


class PodFields(OpenModel):
    """The pod fields a template may set (``podsecurity.POD_FIELDS``, and those an escalation gates)."""

    affinity: Obj = None
    containers: Optional[list[Container]] = Field(None, max_length=16)
    dns_config: Obj = None
    dns_policy: Optional[str] = Field(None, max_length=64)
    enable_service_links: Optional[bool] = None
    host_aliases: Objs = Field(None, max_length=64)
    host_users: Optional[bool] = None
    image_pull_secrets: Objs = Field(None, max_length=16)
    init_containers: Optional[list[Container]] = Field(None, max_length=16)
    node_selector: Optional[dict[str, Annotated[str, Field(max_length=63)]]] = Field(None, max_length=64)
    os: Obj = None
    priority_class_name: Optional[str] = Field(None, max_length=253)
    readiness_gates: Objs = Field(None, max_length=16)
    resource_claims: Objs = Field(None, max_length=16)
    runtime_class_name: Optional[str] = Field(None, max_length=253)
    scheduler_name: Optional[str] = Field(None, max_length=253)
    scheduling_gates: Objs = Field(None, max_length=16)
    security_context: Optional[PodSecurityContext] = None
    termination_grace_period_seconds: Optional[int] = None
    tolerations: Objs = Field(None, max_length=64)
    topology_spread_constraints: Objs = Field(None, max_length=16)
    volumes: Optional[list[Volume]] = Field(None, max_length=64)
    # gated (podsecurity.GATED_POD_FIELDS)
    host_network: Optional[bool] = None
    host_pid: Optional[bool] = Field(None, alias="hostPID")
    host_ipc: Optional[bool] = Field(None, alias="hostIPC")
    service_account_name: Optional[str] = Field(None, max_length=253)
    service_account: Optional[str] = Field(None, max_length=253)
    automount_service_account_token: Optional[bool] = None

    CEL = (
        _refused("hostNamespaces", "hostNetwork", "hostNetwork", _not_true("hostNetwork")),
        _refused("hostNamespaces", "hostPID", "hostPID", _not_true("hostPID")),
        _refused("hostNamespaces", "hostIPC", "hostIPC", _not_true("hostIPC")),
        _refused("serviceAccount", "serviceAccountName", "serviceAccountName", "!has(self.serviceAccountName)"),
        _refused("serviceAccount", "serviceAccount", "serviceAccount", "!has(self.serviceAccount)"),
        _refused(
            "serviceAccount", "automountServiceAccountToken", "automountServiceAccountToken true",
            _not_true("automountServiceAccountToken"),
        ),
    )


def _label_rules(field: str, values: bool) -> CelRule:
    key = f"size(k) <= {names.MAX_LABEL_KEY} && k.matches('{names.LABEL_KEY}')"
    value = f" && size(self.{field}[k]) <= {names.MAX_LABEL} && self.{field}[k].matches('{names.LABEL_VALUE}')"
    return CelRule(
        f"!has(self.{field}) || self.{field}.all(k, {key}{value if values else ''})",
        f"{field}: keys must be qualified names ([prefix/]name, name at most 63 characters)"
        + (", values at most 63 characters of [A-Za-z0-9-_.] starting and ending alphanumeric" if values else ""),
        f".{field}",
    )


def _profile_annotations_rule() -> CelRule:
    """The legacy seccomp/AppArmor annotations must confine (``podsecurity.confined_annotation``)."""
    keys = " || ".join(f"k.startsWith('{p}')" for p in podsecurity.PROFILE_ANNOTATIONS)
    values = " || ".join(f"self.annotations[k] == '{v}'" for v in podsecurity.CONFINED_ANNOTATION_VALUES)
    return _refused(
        "unconfined", "annotations", "a seccomp or AppArmor annotation that does not confine",
        f"!has(self.annotations) || self.annotations.all(k, !({keys}) || {values} "
        "|| self.annotations[k].startsWith('localhost/'))",
    )


def _label_errors(mapping: Optional[dict[str, str]], field: str, values: bool) -> list[tuple[str, str]]:
    found = names.labels_errors(mapping or {}) if values else names.annotations_errors(mapping or {})
    return [(field, err) for err in found]


Labels = Optional[dict[str, str]]


class TemplateMetadata(OpenModel):
    """The full form's ``metadata``: the pod's labels and annotations (checked like the API server)."""

    labels: Labels = Field(None, max_length=64)
    annotations: Labels = Field(None, max_length=64)

    CEL = (_label_rules("labels", True), _label_rules("annotations", False), _profile_annotations_rule())

    @model_validator(mode="after")
    def _keys(self) -> "TemplateMetadata":
        found = _label_errors(self.labels, "labels", True) + _label_errors(self.annotations, "annotations", False)
        if found:
            raise _field_errors(found)
        return self


class PodTemplate(PodFields, ContainerFields):
    """A pod template overlay, short form (pod fields, main-container fields, labels and
    annotations at the top) or full form ``{metadata, spec}`` (see
    ``operator/dcmdp_operator/podtemplate.py``). Only allow-listed fields are accepted
    (:mod:`dcmdp.podsecurity`) unless the validation context's ``allow_escalations`` names the
    escalation of the others; label keys and values are checked as the API server checks them on
    the pods (a 422 otherwise)."""

    spec: Optional[PodFields] = None
    metadata: Optional[TemplateMetadata] = None
    labels: Labels = Field(None, max_length=64)
    annotations: Labels = Field(None, max_length=64)

    CEL = PodFields.CEL + TemplateMetadata.CEL

    @model_validator(mode="before")
    @classmethod
    def _depth(cls, data: Any) -> Any:
        """Refused before anything walks it recursively (serialising, diffing, the checks below)."""
        path = podsecurity.too_deep(data)
        if path is not None:
            short = path if len(path) <= 60 else path[:60] + "…"
            raise _field_errors([(path.split(".")[0].split("[")[0], f"nested deeper than {podsecurity.MAX_DEPTH} "
                                  f"levels (at {short}): no pod field is")])
        return data

    @model_validator(mode="after")
    def _no_escalation(self, info: ValidationInfo) -> "PodTemplate":
        allow = (info.context or {}).get("allow_escalations", ())
        found = [(p.lstrip("."), m) for p, m in podsecurity.violations(self.overlay(), "", allow)]
        found += _label_errors(self.labels, "labels", True) + _label_errors(self.annotations, "annotations", False)
        if found:
            raise _field_errors(found)
        return self

    def overlay(self) -> dict[str, Any]:
        """The template as written (JSON-compatible, camelCase), for the operator to merge."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


# --------------------------------------------------------------------------- trainer / rollout


class DeepSpeedSpec(SpecModel):
    enabled: bool = False
    zero_stage: int = Field(2, ge=0, le=3)


class TrainerSpec(SpecModel):
    """The trainer: high-precision, high-end nodes in a cluster."""

    precision: TrainerPrecision = "fp32"
    replicas: int = Field(1, ge=1, le=4096)
    gpus_per_replica: Optional[int] = Field(
        None, ge=1, le=256,
        description="Ranks (processes, one per GPU) each replica starts, torchrun's way; world = replicas × "
        "gpusPerReplica, rank 0 serves gRPC. Default: the template's nvidia.com/gpu limit, else 1. More than one "
        "rank in all trains data-parallel through DeepSpeed (ZeRO stage 0 when deepspeed.enabled is false).",
    )
    threads: int = Field(0, ge=0, le=1024, description="torch threads per process (0 = default).")
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    device: Device = Field(
        "auto", description="Where the model, batches, optimizer state and autocast live: cpu, cuda, or auto "
        "(cuda when present). cuda where none is present fails at start."
    )
    micro_batch_tokens: int = Field(
        0, ge=0, le=1 << 40,
        description="Token budget (rows × padded length) of every forward and backward: the π_old, reference and "
        "sampled-version passes and each mini-batch (gradients accumulated over its micro-batches; the update "
        "is the mini-batch's). 0 = one micro-batch per pass. A sequence longer than the budget runs alone.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute each layer's activations in the backward pass instead of keeping them."
    )
    weight_bucket_mib: int = Field(  # = buckets.DEFAULT_BUCKET_BYTES (which imports torch; a test keeps them equal)
        64, ge=1, le=128, alias="weightBucketMiB",
        description="MiB of the buckets new weights move in to the pools: one broadcast bucket, one weight-stream "
        "chunk, one crc32. Larger means fewer operations per version; the memory it costs: the trainer holds one "
        "bucket per broadcast under way and ~1.35 per weight stream (at most 8), each worker four (on its GPU with "
        "NCCL). The in-process runner moves no weights and ignores it.",
    )
    image: Optional[str] = Field(None, description="Container image (cluster only).")
    template: PodTemplate = Field(
        default_factory=PodTemplate, description="Pod template overlay: nodeSelector, tolerations, resources…"
    )


class PoolSpec(SpecModel):
    """One rollout pool: an inference engine at its own precision on its own nodes."""

    name: str = Field(..., min_length=1, max_length=40, pattern=DNS_LABEL)
    replicas: int = Field(1, ge=0, le=4096)
    engine: EngineName = "hf"
    precision: PoolPrecision = "bf16"
    noise: float = Field(0.0, ge=0, le=100, description="Gaussian logit noise σ (emulates a worse engine).")
    lag: int = Field(0, ge=0, le=1024, description="Experiments: sample with weights K versions behind.")
    quant_group_size: int = Field(
        128, ge=1, le=65_536, description="precision int4: weights per quantisation group along a Linear's input "
        "dimension (clipped to the layer's width).")
    device: Device = Field(
        "auto", description="hf engine: where the model and sampling run (auto: cuda when present). vLLM "
        "places itself."
    )
    tensor_parallel_size: int = Field(
        1, ge=1, le=64, description="vllm engine: GPUs each worker shards the model over (vLLM's "
        "tensor_parallel_size; request as many GPUs in the pool's template resources)."
    )
    tolerance: Union[float, Literal["auto"], None] = Field(
        None, description="Per-pool c (defaults to algorithm.constraint.tolerance)."
    )
    image: Optional[str] = None
    template: PodTemplate = Field(default_factory=PodTemplate)

    _tolerance = field_validator("tolerance", mode="before")(
        classmethod(lambda cls, v: None if v is None else _tolerance(v))
    )

    CEL = (
        CelRule("!has(self.tensorParallelSize) || self.tensorParallelSize == 1 "
                "|| (has(self.engine) && self.engine == 'vllm')",
                "tensorParallelSize > 1 needs engine vllm", ".tensorParallelSize"),
    )

    @model_validator(mode="after")
    def _tensor_parallel(self) -> "PoolSpec":
        if self.tensor_parallel_size > 1 and self.engine != "vllm":
            raise ValueError(f"tensorParallelSize > 1 needs engine vllm (engine is {self.engine!r})")
        return self


class RolloutSpec(SpecModel):
    pools: list[PoolSpec] = Field(
        default_factory=lambda: [PoolSpec(name="default")], min_length=1, max_length=64
    )
    batch_prompts: int = Field(0, ge=0, le=65_536, description="Prompts per lease (0 = miniBatchSize).")
    lease_timeout_seconds: float = Field(60.0, gt=0, le=86_400)
    stall_timeout_seconds: float = Field(
        600.0, ge=0, le=604_800,
        description="Fail the run when no rollout has been accepted for this long while workers submit or "
        "none are connected (0 = wait forever).",
    )

    CEL = (
        CelRule("self.pools.all(p, self.pools.exists_one(q, q.name == p.name))", "pool names must be unique", ".pools"),
        CelRule("self.pools.exists(p, !has(p.replicas) || p.replicas >= 1)", "at least one pool needs replicas >= 1", ".pools"),
    )

    @model_validator(mode="after")
    def _unique(self) -> "RolloutSpec":
        names = [p.name for p in self.pools]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"pool names must be unique (repeated: {', '.join(dup)})")
        if sum(p.replicas for p in self.pools) == 0:
            raise ValueError("at least one pool needs replicas >= 1")
        return self


# ------------------------------------------------------------------------------------ run-level
class PVCSpec(SpecModel):
    enabled: bool = False
    size: str = Field("10Gi", pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$")
    storage_class_name: Optional[str] = Field(None, max_length=names.MAX_SUBDOMAIN, pattern=names.SUBDOMAIN)


class CheckpointSpec(SpecModel):
    every_steps: int = Field(50, ge=0, le=10_000_000, description="0 = only at the end.")
    keep: int = Field(2, ge=1, le=1000)
    pvc: PVCSpec = Field(default_factory=PVCSpec)


class EvalSpec(SpecModel):
    every_steps: int = Field(0, ge=0, le=10_000_000, description="Held-out eval period (0 = start and end).")


class FailurePolicySpec(SpecModel):
    max_restarts: int = Field(3, ge=0, le=1000)


class TLSSpec(SpecModel):
    """TLS on the trainer's gRPC port, for the rollout workers and the operator's status reads
    (cluster only; ``dcmdp run`` listens on localhost). Without it the run token crosses the pod
    network in clear text."""

    secret_name: Optional[str] = Field(
        None, max_length=names.MAX_SUBDOMAIN, pattern=names.DNS_1123_SUBDOMAIN,
        description="A Secret in the run's namespace with tls.crt and tls.key (type kubernetes.io/tls, e.g. "
        "cert-manager's) for the trainer; unset: plaintext. The certificate must name the trainer as the "
        "clients reach it: serverName.",
    )
    ca_key: str = Field(
        "ca.crt", min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$",
        description="The Secret's key holding the CA the workers and the operator verify the trainer with "
        "(a self-signed certificate: tls.crt).",
    )
    server_name: Optional[str] = Field(
        None, max_length=names.MAX_SUBDOMAIN, pattern=names.DNS_1123_SUBDOMAIN,
        description="The DNS name the clients expect in the certificate (default: <run>-trainer-0.<run>-trainer).",
    )


class SchedulingSpec(SpecModel):
    gang: Literal["none", "kueue", "volcano"] = "none"
    queue_name: Optional[str] = Field(
        None,
        max_length=names.MAX_LABEL,
        pattern=names.SUBDOMAIN,
        description="Kueue LocalQueue or Volcano queue (a label value on the children: at most 63 characters).",
    )
    priority_class_name: Optional[str] = Field(None, max_length=names.MAX_SUBDOMAIN, pattern=names.SUBDOMAIN)

    CEL = (
        CelRule(
            "self.gang != 'kueue' || (has(self.queueName) && size(self.queueName) > 0)",
            "gang: kueue needs queueName",
            ".queueName",
        ),
    )

    @model_validator(mode="after")
    def _queue(self) -> "SchedulingSpec":
        if self.gang == "kueue" and not self.queue_name:
            raise ValueError("gang: kueue needs queueName")
        return self


class RunSpec(SpecModel):
    model: ModelSpec = Field(default_factory=ModelSpec)
    task: TaskSpec = Field(default_factory=TaskSpec)
    algorithm: AlgorithmSpec = Field(default_factory=AlgorithmSpec)
    trainer: TrainerSpec = Field(default_factory=TrainerSpec)
    rollout: RolloutSpec = Field(default_factory=RolloutSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    eval: EvalSpec = Field(default_factory=EvalSpec)
    suspend: bool = False
    failure_policy: FailurePolicySpec = Field(default_factory=FailurePolicySpec)
    ttl_seconds_after_finished: Optional[int] = Field(None, ge=0, le=365 * 86_400)
    scheduling: SchedulingSpec = Field(default_factory=SchedulingSpec)
    tls: TLSSpec = Field(default_factory=TLSSpec)

    CEL = (
        CelRule(
            "self.algorithm.maxStaleness == 0 || self.rollout.pools.all(p, !has(p.lag) || p.lag <= self.algorithm.maxStaleness)",
            "a rollout pool's lag exceeds algorithm.maxStaleness: every rollout would be dropped",
            ".rollout.pools",
        ),
    )

    @model_validator(mode="after")
    def _cross(self) -> "RunSpec":
        for i, pool in enumerate(self.rollout.pools):
            if pool.lag > self.algorithm.max_staleness and pool.lag > 0 and self.algorithm.max_staleness > 0:
                raise ValueError(
                    f"rollout.pools[{i}].lag ({pool.lag}) exceeds algorithm.maxStaleness "
                    f"({self.algorithm.max_staleness}): every rollout would be dropped"
                )
        return self

    def pool_tolerance(self, pool: PoolSpec) -> Union[float, Literal["auto"]]:
        return pool.tolerance if pool.tolerance is not None else self.algorithm.constraint.tolerance


class Metadata(SpecModel):
    """``metadata`` as Kubernetes validates it (rules in :mod:`dcmdp.names`, shared with the
    operator): the run name a DNS-1035 label short enough for its children's names, the namespace
    a DNS-1123 label, label and annotation keys/values as the API server checks them. The fields
    the API server sets (uid, resourceVersion, …) are accepted and kept; any other is an error."""

    name: str = Field("run", description=f"A DNS-1035 label of at most {names.MAX_RUN_NAME} characters.")
    namespace: Optional[str] = None
    labels: Optional[dict[str, str]] = None
    annotations: Optional[dict[str, str]] = None
    generate_name: Optional[str] = None
    uid: Optional[str] = None
    resource_version: Optional[str] = None
    generation: Optional[int] = None
    creation_timestamp: Optional[str] = None
    deletion_timestamp: Optional[str] = None
    deletion_grace_period_seconds: Optional[int] = None
    finalizers: Optional[list[str]] = None
    owner_references: Optional[list[dict[str, Any]]] = None
    managed_fields: Optional[list[dict[str, Any]]] = None
    self_link: Optional[str] = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        err = names.run_name_error(v)
        if err:
            raise ValueError(err)
        return v

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, v: Optional[str]) -> Optional[str]:
        err = v is not None and names.dns_1123_label_error(v)
        if err:
            raise ValueError(err)
        return v

    @field_validator("labels", "annotations")
    @classmethod
    def _key_values(cls, v: Optional[dict[str, str]], info: ValidationInfo) -> Optional[dict[str, str]]:
        """Kubernetes' rules for label (or annotation) keys and values, every violation named."""
        errors = names.labels_errors if info.field_name == "labels" else names.annotations_errors
        errs = list(errors(v or {}))
        if errs:
            raise ValueError("; ".join(errs))
        return v


RANKS_MESSAGE = ("more trainer ranks (replicas × gpusPerReplica) than a mini-batch has sequences (miniBatchSize × "
                 "groupSize): every rank takes a share of each mini-batch")


class DCMDPRun(SpecModel):
    api_version: Literal["dcmdp.io/v1alpha1"] = Field(API_VERSION, alias="apiVersion")
    kind: Literal["DCMDPRun"] = KIND
    metadata: Metadata = Field(default_factory=Metadata)
    spec: RunSpec = Field(default_factory=RunSpec)
    status: Optional[dict[str, Any]] = Field(None, description="Written by the operator; ignored here.")

    # The trainer's indexed-Job pod hostnames <run>-trainer-<index> must fit a 63-character label;
    # the pools' Deployments <run>-rollout-<pool> too (the API server sees metadata.name at the root).
    CEL = (
        CelRule(
            "self.spec.trainer.replicas * (has(self.spec.trainer.gpusPerReplica) ? self.spec.trainer.gpusPerReplica : 1)"
            " <= self.spec.algorithm.miniBatchSize * self.spec.algorithm.groupSize",
            f"spec.trainer.gpusPerReplica: {RANKS_MESSAGE}",
            ".spec.trainer.gpusPerReplica",
        ),
        CelRule(
            f"size(self.metadata.name) + {len(names.TRAINER_SUFFIX) + 1} + "
            f"size(string(self.spec.trainer.replicas - 1)) <= {names.MAX_LABEL}",
            "metadata.name: the trainer pod hostname <name>-trainer-<index> must be at most 63 characters",
            ".metadata.name",
        ),
        CelRule(
            f"self.spec.rollout.pools.all(p, size(self.metadata.name) + size(p.name) <= {names.MAX_RUN_AND_POOL})",
            "spec.rollout.pools: the Deployment name <name>-rollout-<pool> must be at most 63 characters",
            ".spec.rollout.pools",
        ),
    )

    @model_validator(mode="after")
    def _hostnames(self) -> "DCMDPRun":
        err = names.trainer_hostname_error(self.metadata.name, self.spec.trainer.replicas)
        if err:
            raise _field_errors([("metadata.name", err)])
        return self

    @model_validator(mode="after")
    def _ranks(self) -> "DCMDPRun":
        """The CEL rule's twin (a default from the template's GPU limit is checked when the trainer starts)."""
        spec = self.spec
        world = spec.trainer.replicas * (spec.trainer.gpus_per_replica or 1)
        rows = spec.algorithm.mini_batch_size * spec.algorithm.group_size
        if world > rows:
            raise _field_errors([("spec.trainer.gpusPerReplica", RANKS_MESSAGE)])
        return self

    @model_validator(mode="after")
    def _child_names(self) -> "DCMDPRun":
        for i, pool in enumerate(self.spec.rollout.pools):
            if len(self.metadata.name) + len(pool.name) > names.MAX_RUN_AND_POOL:
                raise ValueError(
                    f"spec.rollout.pools[{i}].name: run name {self.metadata.name!r} and pool name {pool.name!r} "
                    f"together exceed {names.MAX_RUN_AND_POOL} characters (the pool's Deployment is named "
                    f"<run>{names.POOL_INFIX}<pool>, at most {names.MAX_LABEL})")
        return self


# ------------------------------------------------------------------------------------- loading
class SpecError(ValueError):
    """A manifest failed validation. ``errors`` is a list of (field path, message); ``hint``, when
    set, a line on what to do (printed after the errors)."""

    def __init__(self, errors: list[tuple[str, str]], source: str = "manifest"):
        self.errors = errors
        self.source = source
        self.hint: Optional[str] = None
        lines = "\n".join(f"  {path}: {msg}" for path, msg in errors)
        super().__init__(f"{source} is invalid:\n{lines}")


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and ("[" in part or part.startswith(("float", "literal", "function"))):
            # pydantic names union branches in the location; they are noise for users
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "(root)"


FIELD_ERRORS = "\n"  # joins "field: message" parts of one validator's error (see validation_errors)
_FIELD_ERROR = re.compile(r"^([A-Za-z0-9_.\[\]]+): (.*)$", re.S)


def _field_errors(found: list[tuple[str, str]]) -> ValueError:
    """One validator's errors about several fields below its own (paths relative to it)."""
    # Ends with the separator, so one error is reported at its own field too.
    return ValueError("".join(f"{path}: {msg}{FIELD_ERRORS}" for path, msg in found))


def _fields_at(root: Optional[type[BaseModel]], loc: tuple[Any, ...]) -> list[str]:
    """The manifest names (aliases) of the model fields at ``loc`` below ``root`` (list indices and
    union branches skipped), or [] where the path leaves the typed models."""
    model = root
    for part in loc:
        if model is None:
            return []
        if not isinstance(part, str):
            continue
        field = next((f for name, f in model.model_fields.items() if (f.alias or name) == part), None)
        if field is None:
            continue  # a union branch's name in the location
        candidates = [field.annotation, *get_args(field.annotation)]
        for arg in list(candidates):
            candidates += get_args(arg)
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return [f.alias or name for name, f in model.model_fields.items()] if model is not None else []


def validation_errors(exc: ValidationError, root: Optional[type[BaseModel]] = None) -> list[tuple[str, str]]:
    """pydantic's errors as ``(field path, message)`` pairs, a path written like a manifest's
    (``spec.rollout.pools[1].name``), the first message per path (what :class:`SpecError` holds).
    With ``root`` (the model validated), an unknown field names the closest known one."""
    seen: dict[str, str] = {}
    for err in exc.errors():
        path = _path(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; fields are camelCase)"
            close = difflib.get_close_matches(str(err["loc"][-1]), _fields_at(root, tuple(err["loc"][:-1])), n=1,
                                              cutoff=0.7)
            if close:
                camel = "; fields are camelCase" if "_" in str(err["loc"][-1]) else ""
                msg = f"unknown field (did you mean {close[0]}?{camel})"
        for part in filter(None, msg.split(FIELD_ERRORS)):
            m = _FIELD_ERROR.match(part) if FIELD_ERRORS in msg or path == "(root)" else None
            if m:  # a validator named fields below its own: report each at its path
                sub = m.group(1)
                seen.setdefault(sub if path == "(root)" else f"{path}.{sub}".replace(".[", "["), m.group(2))
            else:
                seen.setdefault(path, part)
    return list(seen.items())


def parse_run(data: Any, source: str = "manifest", *, allow_escalations: frozenset[str] = frozenset()) -> DCMDPRun:
    """Validate a manifest already parsed into Python objects. ``allow_escalations``: the pod
    template escalations the cluster admin allows (:mod:`dcmdp.podsecurity`; none by default)."""
    if not isinstance(data, dict):
        raise SpecError([("(root)", "a DCMDPRun manifest must be a mapping")], source)
    try:
        # Manifests use the camelCase names only (the API server knows no others); Python code
        # may still construct models with snake_case keywords.
        return DCMDPRun.model_validate(data, by_name=False, context={"allow_escalations": allow_escalations})
    except ValidationError as exc:
        raise SpecError(validation_errors(exc, DCMDPRun), source) from None


def load_run(path: Union[str, Path]) -> DCMDPRun:
    """Read and validate a YAML manifest, read with the limits of :mod:`dcmdp.yamlfile` (UTF-8,
    no duplicate keys, bounded depth and alias expansion). Of a multi-document file, the one
    document of kind DCMDPRun (two or more are an error)."""
    path = Path(path)
    try:
        docs = read_documents(path)
    except FileNotFoundError:
        raise SpecError([("(file)", f"no such file: {path}")], str(path)) from None
    except YAMLFileError as exc:
        raise SpecError([(exc.where, str(exc))], str(path)) from None
    runs = [d for d in docs if isinstance(d, dict) and d.get("kind") == KIND]
    if len(runs) > 1:
        raise SpecError([("kind", f"{len(runs)} documents of kind {KIND} in the file: one manifest per file")],
                        str(path))
    if not runs:
        if len(docs) == 1 and isinstance(docs[0], dict) and "kind" not in docs[0] and (
                {"runs", "runDefaults"} & set(docs[0])):
            raise SpecError([("(file)", "these are Helm values for the dcmdp chart (runs/runDefaults), not a "
                                        f"{KIND} manifest: `helm template dcmdp helm/dcmdp -f {path}` renders the "
                                        "runs (checked against the chart's values.schema.json); pipe one run into "
                                        "`dcmdp validate --cluster -f -`")], str(path))
        if len(docs) == 1:
            return parse_run(docs[0], str(path))
        raise SpecError([("kind", f"no document of kind {KIND} in the file")], str(path))
    return parse_run(runs[0], str(path))


def dump_run(run: DCMDPRun) -> dict[str, Any]:
    """The resolved manifest (defaults filled in), camelCase, JSON-compatible."""
    return run.model_dump(mode="json", by_alias=True, exclude_none=True)
