"""The name rules of a run, shared by ``dcmdp validate`` (the spec) and the operator.

Kubernetes rules (``k8s.io/apimachinery/pkg/util/validation``):

* DNS-1123 label: ``[a-z0-9]([-a-z0-9]*[a-z0-9])?``, at most 63 characters (namespaces, pool names);
* DNS-1035 label: the same, starting with a letter (Service names and every child object's name);
* label/annotation key: an optional DNS-1123 subdomain prefix (≤ 253) and ``/``, then a name of at
  most 63 characters ``([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]``; a label value is empty or such a
  name; all annotations together at most 256 KiB.

A run's children are named ``<run>-token``, ``-config``, ``-trainer``, ``-checkpoints`` and
``<run>-rollout-<pool>``, each a DNS-1035 label of at most 63 characters. So the run name is a
DNS-1035 label of at most :data:`MAX_RUN_NAME` (51) characters, and ``run`` + ``pool`` at most
:data:`MAX_RUN_AND_POOL` (54) characters together. The trainer's indexed Job names its pods'
hostnames ``<run>-trainer-<index>`` (a DNS-1123 label): :func:`trainer_hostname_error`.

The same rules as patterns the CRD's CEL rules use (``LABEL_KEY``, ``LABEL_VALUE``,
``SUBDOMAIN``): RE2 and CEL string literals read them as Python does (``[.]``, no backslash).
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Mapping

MAX_LABEL = 63
DNS_1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS_1123_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
QUALIFIED_NAME = r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$"
MAX_ANNOTATIONS_BYTES = 256 * 1024

CHILD_SUFFIXES = ("-token", "-config", "-trainer", "-checkpoints")
POOL_INFIX = "-rollout-"
MAX_RUN_NAME = MAX_LABEL - max(len(s) for s in CHILD_SUFFIXES)
MAX_RUN_AND_POOL = MAX_LABEL - len(POOL_INFIX)

# For CEL string literals (no backslash escapes) and Go's RE2: the same rules as above.
SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
LABEL_KEY = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
MAX_SUBDOMAIN = 253
MAX_LABEL_KEY = MAX_SUBDOMAIN + 1 + MAX_LABEL
TRAINER_SUFFIX = "-trainer"

_1123 = re.compile(DNS_1123_LABEL)
_1035 = re.compile(DNS_1035_LABEL)
_SUBDOMAIN = re.compile(DNS_1123_SUBDOMAIN)
_QUALIFIED = re.compile(QUALIFIED_NAME)


def dns_1123_label_error(value: str, max_len: int = MAX_LABEL) -> str | None:
    if len(value) > max_len:
        return f"{value!r} is {len(value)} characters long: at most {max_len}"
    if not _1123.match(value):
        return f"{value!r} is not a DNS-1123 label: lower-case letters, digits and '-', starting and ending alphanumeric"
    return None


def dns_1035_label_error(value: str, max_len: int = MAX_LABEL) -> str | None:
    if len(value) > max_len:
        return f"{value!r} is {len(value)} characters long: at most {max_len}"
    if not _1035.match(value):
        return (f"{value!r} is not a DNS-1035 label: lower-case letters, digits and '-', starting with a "
                "letter and ending alphanumeric")
    return None


def run_name_error(name: str) -> str | None:
    """Why ``name`` cannot name a run (its children must be valid names too), or None."""
    err = dns_1035_label_error(name, MAX_RUN_NAME)
    if err and len(name) > MAX_RUN_NAME:
        return f"{err} (the children append up to {MAX_LABEL - MAX_RUN_NAME} characters, e.g. '-checkpoints')"
    return err


def child_name_error(name: str) -> str | None:
    """Why ``name`` cannot name a child object (a DNS-1035 label of at most 63), or None."""
    return dns_1035_label_error(name)


def qualified_key_error(key: str) -> str | None:
    """Why ``key`` is not a valid label or annotation key, or None."""
    prefix, _, name = key.rpartition("/")
    if "/" in key and not prefix:
        return f"key {key!r}: empty prefix before '/'"
    if prefix and (len(prefix) > 253 or not _SUBDOMAIN.match(prefix)):
        return f"key {key!r}: prefix {prefix!r} is not a DNS-1123 subdomain of at most 253 characters"
    if len(name) > MAX_LABEL or not _QUALIFIED.match(name):
        return (f"key {key!r}: name part must be at most 63 characters, alphanumerics, '-', '_' or '.', "
                "starting and ending alphanumeric")
    return None


def label_value_error(value: Any) -> str | None:
    if not isinstance(value, str):
        return f"value {value!r} must be a string"
    if value and (len(value) > MAX_LABEL or not _QUALIFIED.match(value)):
        return (f"value {value!r} must be empty or at most 63 characters, alphanumerics, '-', '_' or '.', "
                "starting and ending alphanumeric")
    return None


def labels_errors(labels: Mapping[str, Any]) -> Iterator[str]:
    for key, value in labels.items():
        err = qualified_key_error(str(key)) or label_value_error(value)
        if err:
            yield f"{key}: {err}"


def annotations_errors(annotations: Mapping[str, Any]) -> Iterator[str]:
    total = 0
    for key, value in annotations.items():
        err = qualified_key_error(str(key))
        if err:
            yield f"{key}: {err}"
        elif not isinstance(value, str):
            yield f"{key}: value must be a string"
        else:
            total += len(str(key).encode()) + len(value.encode())
    if total > MAX_ANNOTATIONS_BYTES:
        yield f"annotations total {total} bytes: at most {MAX_ANNOTATIONS_BYTES}"


def trainer_name(run: str) -> str:
    """The trainer's indexed Job and headless Service."""
    return f"{run}{TRAINER_SUFFIX}"


def pool_name(run: str, pool: str) -> str:
    """A rollout pool's Deployment."""
    return f"{run}{POOL_INFIX}{pool}"


def trainer_hostname(run: str, index: int) -> str:
    """The hostname of trainer pod ``index`` of the indexed Job (``<job>-<index>``)."""
    return f"{trainer_name(run)}-{index}"


def trainer_hostname_error(run: str, replicas: int) -> str | None:
    """Why the last trainer pod's hostname would be refused (longer than 63), or None."""
    host = trainer_hostname(run, replicas - 1)
    if len(host) <= MAX_LABEL:
        return None
    return (f"the trainer pod hostname {host!r} would be {len(host)} characters (at most {MAX_LABEL}): "
            f"use a run name of at most {MAX_LABEL - len(host) + len(run)} characters or fewer trainer replicas")
