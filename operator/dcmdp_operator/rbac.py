"""The exact Kubernetes permissions the operator uses: nothing more.

``RULES`` is what the Helm chart grants (a Role per watched namespace, or a ClusterRole with
``--all-namespaces``); the chart's test compares its rendered rules with this list, and
``tests/test_operator_rbac.py`` checks the list against what the code touches: the kinds
``children.build`` produces × the verbs ``apply`` uses, the requests the operator actually sent to
the API emulator during the end-to-end tests, and the two permissions no request shows:

* ``dcmdpruns/finalizers: update`` – setting ``blockOwnerDeletion`` on a child's owner reference
  needs it where the OwnerReferencesPermissionEnforcement admission plugin is on;
* nothing else: kopf runs standalone (no peering objects) with cluster scanning off (no CRD or
  namespace watching), and never reads pods (restarts come from the Job's status).
"""

from __future__ import annotations

# verbs of a child: read it, create it once, server-side apply it (a PATCH)
CHILD_VERBS = ["get", "create", "patch"]

RULES: list[dict[str, list[str]]] = [
    {"apiGroups": ["dcmdp.io"], "resources": ["dcmdpruns"], "verbs": ["list", "watch", "patch", "delete"]},
    {"apiGroups": ["dcmdp.io"], "resources": ["dcmdpruns/status"], "verbs": ["patch"]},
    {"apiGroups": ["dcmdp.io"], "resources": ["dcmdpruns/finalizers"], "verbs": ["update"]},
    {"apiGroups": [""], "resources": ["events"], "verbs": ["create"]},
    {"apiGroups": [""], "resources": ["configmaps", "persistentvolumeclaims", "secrets", "services"], "verbs": CHILD_VERBS},
    {"apiGroups": ["apps"], "resources": ["deployments"], "verbs": CHILD_VERBS},
    {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": CHILD_VERBS},
    {"apiGroups": ["scheduling.volcano.sh"], "resources": ["podgroups"], "verbs": CHILD_VERBS},
]

# Needed without a request showing it (see the module docstring).
IMPLIED: list[tuple[str, str, str]] = [("dcmdp.io", "dcmdpruns/finalizers", "update")]


def triples(rules: list[dict[str, list[str]]] = RULES) -> set[tuple[str, str, str]]:
    """Rules flattened to (apiGroup, resource, verb)."""
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
