"""A seeded fuzz of ``dcmdp validate``: 600 manifests mutated from the examples (values of every
type at random fields, deleted and unknown keys, hostile YAML text: duplicate keys, extra
documents, bad bytes, alias bombs, deep nesting, truncation).

Asserted for every one: ``validate`` exits 0 or 2, never a traceback; a rejection names a field of
the manifest or the cause (``(file)``, ``(yaml)``, ``kind``); a manifest mutated in a way that is
always invalid is rejected; a valid one round-trips through ``validate --print`` unchanged.
"""

from __future__ import annotations

import copy
import random
from pathlib import Path
from typing import Any, Optional

from dcmdp import yamlfile
from dcmdp.cli import main as cli_main
from dcmdp.spec import dump_run, load_run

REPO = Path(__file__).resolve().parents[1]
CASES = 600
VALUES: list[Any] = [-1, 0, 1, 7, 2**63, 1.5, -0.25, 1e308, "2e3", "", "x" * 70, "true", "null", "λ", True,
                     False, None, [], {}, [1, "a"], {"k": "v"}, "0x1f", "Run", "a-b"]
TOP = {"(file)", "(yaml)", "(root)", "kind", "apiVersion", "metadata", "spec", "status"}


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


def _parent(doc: Any, path: tuple) -> Any:
    for p in path[:-1]:
        doc = doc[p]
    return doc


BAD_NAMES = ["1run", "Run", "a" * 52, "-a", "run_1"]
# Objects passed on as written (pod template fields of dcmdp.podsecurity's allow-list that are free-form).
FREE_FORM = {"resources", "affinity", "tolerations", "topologySpreadConstraints", "dnsConfig", "hostAliases",
             "imagePullSecrets", "os", "readinessGates", "resourceClaims", "schedulingGates", "resizePolicy",
             "emptyDir", "configMap", "persistentVolumeClaim", "ephemeral", "downwardAPI", "fieldRef",
             "resourceFieldRef", "configMapKeyRef", "configMapRef", "clusterTrustBundle"}


def _mutate(rng: random.Random, doc: dict) -> tuple[dict, bool]:
    """(mutated manifest, whether it is certainly invalid)."""
    doc = copy.deepcopy(doc)
    invalid = False
    for _ in range(rng.randint(1, 3)):
        paths = _paths(doc)
        path = rng.choice(paths)
        parent = _parent(doc, path)
        op = rng.random()
        if op < 0.55:
            parent[path[-1]] = copy.deepcopy(rng.choice(VALUES))
        elif op < 0.7 and isinstance(parent, dict):
            del parent[path[-1]]
        elif op < 0.85 and isinstance(parent, dict) and path[0] in ("spec", "metadata") and len(path) > 1:
            parent["bogusField" + str(rng.randint(0, 9))] = 1
        else:
            doc.setdefault("metadata", {})["name"] = rng.choice(BAD_NAMES)
    # Judged on the result: a later mutation may have removed what an earlier one broke.
    for path in _paths(doc):
        if str(path[-1]).startswith("bogusField") and path[:2] not in (("metadata", "labels"), ("metadata", "annotations")) \
                and not FREE_FORM & set(path[:-1]) and "engineOptions" not in path:
            invalid = True
    meta = doc.get("metadata")
    if isinstance(meta, dict) and meta.get("name") in BAD_NAMES:
        invalid = True
    return doc, invalid


def _text(rng: random.Random, doc: dict) -> tuple[bytes, Optional[bool]]:
    """YAML bytes of ``doc``, sometimes made hostile: (bytes, whether certainly invalid; None when
    it is no longer ``doc``)."""
    text = yamlfile.dumps(doc)
    op = rng.random()
    if op < 0.65:
        return text.encode(), False
    if op < 0.72:
        return (text + "spec: {}\n").encode(), "spec" in doc
    if op < 0.78:
        return (text + "---\n" + text).encode(), doc.get("kind") == "DCMDPRun"
    if op < 0.83:
        cut = rng.randrange(len(text))
        return text.encode()[:cut] + b"\xff\xfe" + text.encode()[cut:], True
    if op < 0.87:
        return (text + "status:\n  a: &a [x, x, x, x, x, x, x, x]\n" + "".join(
            f"  {c}: &{c} [{', '.join(['*' + p] * 8)}]\n" for p, c in zip("abcdefg", "bcdefgh"))).encode(), True
    if op < 0.91:
        return (text + "status: " + "[" * 100 + "]" * 100 + "\n").encode(), True
    return text.encode()[: rng.randrange(len(text))], None  # truncated: may or may not be valid


def _bases() -> list[dict]:
    return [dump_run(load_run(p)) for p in sorted((REPO / "examples").glob("*.yaml"))]


def test_fuzzed_manifests_are_rejected_clearly_or_round_trip(tmp_path, capsys):
    rng = random.Random(14)
    bases = _bases()
    counts = {"valid": 0, "rejected": 0}
    for case in range(CASES):
        doc, bad_doc = _mutate(rng, rng.choice(bases))
        data, bad_text = _text(rng, doc)
        f = tmp_path / f"m{case}.yaml"
        f.write_bytes(data)
        code = cli_main(["validate", "--print", "-f", str(f)])
        out, err = capsys.readouterr()
        assert code in (0, 2), (case, code, err)
        assert "Traceback" not in err, (case, err)
        if code == 2:
            counts["rejected"] += 1
            assert "is invalid:" in err, (case, err)
            lines = [line for line in err.split("is invalid:", 1)[1].splitlines() if line.strip()]
            errors = [line.strip().split(": ", 1) for line in lines if line.startswith("  ")]  # "  field: message"
            assert errors, (case, err)
            assert all(line.startswith(("  ", "hint: ")) for line in lines), (case, err)  # then at most a hint
            for path, msg in (e + [""] if len(e) == 1 else e for e in errors):
                assert path.split(".")[0].split("[")[0] in TOP and msg, (case, path, msg)
            continue
        assert not (bad_text or (bad_doc and bad_text is not None)), (case, "an invalid manifest was accepted", data[:2000])
        counts["valid"] += 1
        printed = tmp_path / f"p{case}.yaml"
        printed.write_text(out)
        assert cli_main(["validate", "--print", "-f", str(printed)]) == 0
        assert capsys.readouterr().out == out, case
        assert dump_run(load_run(printed)) == dump_run(load_run(f)), case
    assert counts["valid"] >= 20 and counts["rejected"] >= 300, counts  # both sides exercised
