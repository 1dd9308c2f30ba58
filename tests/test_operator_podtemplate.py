"""Pure tests: merging a user's pod template overlay into the operator's pod."""

from __future__ import annotations

import pytest

from dcmdp_operator.podtemplate import TemplateError, apply_overlay, merge, split

POD = {
    "metadata": {"labels": {"app": "x"}},
    "spec": {
        "containers": [{"name": "trainer", "image": "i", "env": [{"name": "A", "value": "1"}]}],
        "volumes": [{"name": "v1", "emptyDir": {}}],
        "tolerations": [{"key": "base"}],
    },
}


def test_short_form_routes_keys_to_pod_container_and_metadata():
    meta, spec, container = split(
        {"nodeSelector": {"n": "1"}, "resources": {"limits": {"cpu": "1"}}, "labels": {"l": "v"}, "env": []}, "t")
    assert meta == {"labels": {"l": "v"}}
    assert spec == {"nodeSelector": {"n": "1"}}
    assert container == {"resources": {"limits": {"cpu": "1"}}, "env": []}


def test_full_form_merges_the_named_container_and_adds_sidecars():
    out = apply_overlay(POD, {
        "metadata": {"annotations": {"a": "b"}},
        "spec": {
            "affinity": {"nodeAffinity": {}},
            "containers": [
                {"name": "trainer", "env": [{"name": "A", "value": "2"}, {"name": "B", "value": "3"}]},
                {"name": "side", "image": "s"},
            ],
            "volumes": [{"name": "v2", "emptyDir": {}}],
            "tolerations": [{"key": "gpu"}],
        },
    }, "trainer", "spec.trainer.template")
    main, side = out["spec"]["containers"]
    assert main["env"] == [{"name": "A", "value": "2"}, {"name": "B", "value": "3"}]  # merged by name
    assert side == {"name": "side", "image": "s"}
    assert [v["name"] for v in out["spec"]["volumes"]] == ["v1", "v2"]
    assert out["spec"]["tolerations"] == [{"key": "base"}, {"key": "gpu"}]  # appended
    assert out["metadata"] == {"labels": {"app": "x"}, "annotations": {"a": "b"}}
    assert POD["spec"]["containers"][0]["env"] == [{"name": "A", "value": "1"}]  # input untouched


def test_merge_rules():
    assert merge({"a": {"b": 1, "c": 2}}, {"a": {"c": 3}}) == {"a": {"b": 1, "c": 3}}
    assert merge([1, 2], [3], "args") == [3]  # other lists are replaced
    assert merge({"k": [1]}, {"k": None}) == {"k": None}


@pytest.mark.parametrize("template, path", [
    ({"nodeSelectr": {}}, "spec.trainer.template.nodeSelectr"),
    ({"spec": {}, "nodeSelector": {}}, "spec.trainer.template.nodeSelector"),
    ({"metadata": {"name": "x"}}, "spec.trainer.template.metadata.name"),
    ({"spec": []}, "spec.trainer.template.spec"),
    ({"spec": {"containers": [{"image": "x"}]}}, "spec.trainer.template.spec.containers"),
    ({"labels": {"a": 1}}, "spec.trainer.template.labels"),
    (["x"], "spec.trainer.template"),
])
def test_errors_name_the_field(template, path):
    with pytest.raises(TemplateError) as info:
        apply_overlay(POD, template, "trainer", "spec.trainer.template")
    assert info.value.path == path
