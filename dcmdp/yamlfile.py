"""YAML files that cannot surprise: reading with limits, writing what reads back the same.

Reading (:func:`read_documents`, :func:`loads`) fails with :class:`YAMLFileError` (a message naming
the cause, and the line where there is one) on:

* a path that is a directory, unreadable, or larger than :data:`MAX_BYTES` (1.5 MiB, the size
  limit of a Kubernetes object);
* bytes that are not UTF-8;
* a key given twice in one mapping (YAML forbids it; PyYAML would keep the last silently);
* nesting deeper than :data:`MAX_DEPTH`, or more than :data:`MAX_NODES` nodes once aliases are
  expanded (a "billion laughs" alias bomb is a few hundred bytes that expand to gigabytes).

Scalars are resolved as Kubernetes does (YAML 1.2 numbers: ``1e-6`` and ``2e3`` are floats), which
PyYAML's YAML 1.1 resolver does not. :func:`dumps` writes with the same resolver, so a string that
would read back as a number, bool or null (a pool named ``2e3``, ``true`` or ``null``) is quoted.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Union

import yaml

MAX_BYTES = 1536 * 1024
MAX_DEPTH = 64
MAX_NODES = 100_000


class YAMLFileError(ValueError):
    """A YAML file or text that cannot be read safely; the message says why (and where).
    ``where`` is ``(file)`` for the file itself (directory, size, encoding), ``(yaml)`` for its
    content (syntax, duplicate keys, depth, aliases)."""

    def __init__(self, message: str, where: str = "(yaml)"):
        super().__init__(message)
        self.where = where


_YAML12_FLOAT = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)[eE][-+]?[0-9]+$")


class YAMLLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading ``1e-6`` as a float like Kubernetes does, and refusing a key
    given twice in one mapping.

    PyYAML implements YAML 1.1, where an exponent without a dot (``1e-6``) is a string; kubectl
    (YAML 1.2 rules) reads a number. Without this, a manifest the cluster accepts would fail here.
    """

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # `<<:` merges; its keys may be overridden
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    raise yaml.constructor.ConstructorError(
                        None, None, "a mapping key must be a scalar", key_node.start_mark) from None
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first at line {seen[key].line + 1})",
                        key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


class YAMLDumper(yaml.SafeDumper):
    """PyYAML's safe dumper with the loader's resolvers: a string that :class:`YAMLLoader` would
    read as another type (``2e3``, ``1e-6``) is written quoted."""


for _cls in (YAMLLoader, YAMLDumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float", _YAML12_FLOAT, list("-+.0123456789"))


def _check_size(node: yaml.Node) -> None:
    """Depth and expanded node count of a composed document (aliases are shared nodes: the
    expanded size of each node is computed once)."""
    sizes: dict[int, int] = {}
    stack: list[tuple[yaml.Node, int, bool]] = [(node, 1, False)]
    while stack:
        n, depth, done = stack.pop()
        if depth > MAX_DEPTH:
            raise YAMLFileError(f"line {n.start_mark.line + 1}: nested deeper than {MAX_DEPTH} levels")
        children: list[yaml.Node] = []
        if isinstance(n, yaml.SequenceNode):
            children = list(n.value)
        elif isinstance(n, yaml.MappingNode):
            children = [c for pair in n.value for c in pair]
        if done:
            sizes[id(n)] = 1 + sum(sizes[id(c)] for c in children)
            if sizes[id(n)] > MAX_NODES:
                raise YAMLFileError(f"more than {MAX_NODES} nodes once aliases are expanded (an alias bomb?)")
            continue
        if id(n) in sizes:
            continue
        stack.append((n, depth, True))
        stack.extend((c, depth + 1, False) for c in children if id(c) not in sizes)


def _one_line(exc: yaml.YAMLError) -> str:
    """A PyYAML error as one line: where, then what."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        what = "; ".join(p for p in (exc.context, exc.problem) if p)
        return where + what
    return " ".join(str(exc).split())


def loads(text: str) -> list[Any]:
    """Every document of ``text`` as Python objects (empty documents left out). Raises
    :class:`YAMLFileError`."""
    loader = YAMLLoader(text)
    docs = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            _check_size(node)
            doc = loader.construct_document(node)
            if doc is not None:
                docs.append(doc)
    except yaml.YAMLError as exc:
        raise YAMLFileError(f"not valid YAML: {_one_line(exc)}") from None
    except RecursionError:
        raise YAMLFileError(f"nested too deeply (more than {MAX_DEPTH} levels)") from None
    finally:
        loader.dispose()
    return docs


def read_text(path: Union[str, Path]) -> str:
    """The UTF-8 text of a file, or of standard input for ``-`` (``helm template … | dcmdp validate
    -f -``). Raises :class:`YAMLFileError` (directory, unreadable, too large, not UTF-8) or
    FileNotFoundError."""
    if str(path) == "-":
        data = sys.stdin.buffer.read(MAX_BYTES + 1)
        path = Path("<stdin>")
    else:
        path = Path(path)
        if path.is_dir():
            raise YAMLFileError(f"{path} is a directory, not a file", "(file)")
        try:
            with path.open("rb") as fh:
                data = fh.read(MAX_BYTES + 1)
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise YAMLFileError(f"cannot read {path}: {exc.strerror or exc}", "(file)") from None
    if len(data) > MAX_BYTES:
        raise YAMLFileError(f"{path} is larger than {MAX_BYTES} bytes", "(file)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise YAMLFileError(f"{path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})",
                            "(file)") from None


def read_documents(path: Union[str, Path]) -> list[Any]:
    """Every document of a YAML file (see :func:`loads`, :func:`read_text`)."""
    return loads(read_text(path))


def dumps(data: Any, sort_keys: bool = False) -> str:
    """YAML that :func:`loads` reads back as ``data`` (keys in the given order unless sorted)."""
    return yaml.dump(data, Dumper=YAMLDumper, sort_keys=sort_keys, allow_unicode=True)
