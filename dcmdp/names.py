"""Kubernetes name rules, and the names Kubernetes derives from a run's name (one place for both).

The rules (k8s.io/apimachinery/pkg/util/validation), as regular expressions that Python, Go's RE2
(the CRD's ``pattern``) and CEL's ``matches()`` all read the same way:

* DNS-1123 label: at most 63 characters ``[a-z0-9-]``, starting and ending alphanumeric (pool
  names; a Job's pod hostname);
* DNS-1035 label: the same, starting with a letter (Service names: the trainer's headless
  Service is named after the run);
* DNS-1123 subdomain: at most 253 characters, labels joined by dots (PriorityClass, StorageClass
  names);
* label value: empty, or at most 63 characters ``[A-Za-z0-9-_.]`` starting and ending
  alphanumeric; label (and annotation) key: an optional DNS subdomain prefix and ``/``, then a
  name of at most 63 characters of the label-value alphabet.

Derived names: a run ``<run>`` owns ``<run>-trainer`` (Job, Service), whose indexed pods are named
and reachable as ``<run>-trainer-<index>`` (the pod hostname, a DNS-1123 label: at most 63
characters), and ``<run>-rollout-<pool>`` (Deployments). The longest of them is the limit on a
run's name: :func:`derived_name_errors`.
"""

from __future__ import annotations

DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
# prefix (a DNS subdomain of at most 253) and '/', then a name of at most 63 characters
LABEL_KEY = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
MAX_LABEL = 63
MAX_SUBDOMAIN = 253
MAX_LABEL_KEY = MAX_SUBDOMAIN + 1 + MAX_LABEL

TRAINER_SUFFIX = "-trainer"
ROLLOUT_INFIX = "-rollout-"


def trainer_name(run: str) -> str:
    """The trainer's indexed Job and headless Service."""
    return f"{run}{TRAINER_SUFFIX}"


def trainer_hostname(run: str, index: int) -> str:
    """The hostname of the trainer pod ``index`` of the indexed Job (``<job>-<index>``)."""
    return f"{trainer_name(run)}-{index}"


def pool_name(run: str, pool: str) -> str:
    """A rollout pool's Deployment."""
    return f"{run}{ROLLOUT_INFIX}{pool}"


def derived_name_errors(run: str, trainer_replicas: int, pools: list[str]) -> list[tuple[str, str]]:
    """``(field, message)`` for each name derived from the run that Kubernetes would refuse: the
    last trainer pod's hostname and each pool's Deployment must fit a 63-character label."""
    out = []
    host = trainer_hostname(run, trainer_replicas - 1)
    if len(host) > MAX_LABEL:
        out.append((
            "metadata.name",
            f"the trainer pod hostname {host!r} would be {len(host)} characters (at most {MAX_LABEL}): "
            f"use a run name of at most {MAX_LABEL - len(host) + len(run)} characters",
        ))
    for i, pool in enumerate(pools):
        name = pool_name(run, pool)
        if len(name) > MAX_LABEL:
            out.append((
                f"spec.rollout.pools[{i}].name",
                f"the Deployment name {name!r} would be {len(name)} characters (at most {MAX_LABEL}): "
                "shorten the run or pool name",
            ))
    return out
