"""Small DCMDPRun manifests for tests (tiny model, short runs, one thread)."""

from __future__ import annotations

import copy
from typing import Any

from dcmdp.spec import DCMDPRun, parse_run

TINY_MODEL = {"hiddenSize": 64, "intermediateSize": 128, "numLayers": 2, "numHeads": 2, "numKvHeads": 1,
              "headDim": 32, "warmStart": {"steps": 0}}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_run(**spec: Any) -> DCMDPRun:
    base = {
        "model": TINY_MODEL,
        "task": {"name": "addition", "digits": 1, "heldOut": 32},
        "algorithm": {"name": "dc-grpo", "groupSize": 4, "promptsPerStep": 8, "miniBatchSize": 4,
                      "learningRate": 1e-3, "steps": 4, "seed": 0,
                      "constraint": {"tolerance": 0.01, "lambdaInit": 0.1}},
        "rollout": {"pools": [{"name": "bf16", "precision": "bf16"}]},
        "checkpoint": {"everySteps": 0},
    }
    return parse_run({"apiVersion": "dcmdp.io/v1alpha1", "kind": "DCMDPRun", "metadata": {"name": "t"},
                      "spec": deep_merge(base, spec)})
