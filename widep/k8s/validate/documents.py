"""Files and text: YAML documents loaded the way ``kubectl`` reads them (duplicate keys refused, absolute line
numbers per document, objects over 1.5 MiB refused), :func:`validate_text` / :func:`validate_file`, and where the
shipped CRDs are."""

from __future__ import annotations

import os
import re
from typing import Any

import yaml

from widep.k8s.validate.core_schema import K8S_VERSION
from widep.k8s.validate.layers import validate_documents
from widep.k8s.validate.problems import Problem, Sink


class _K8sYamlLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # libyaml's parser when PyYAML has it
    """YAML as ``sigs.k8s.io/yaml`` reads it: YAML 1.1 scalars, but timestamps stay strings and
    a bare ``=`` is a string."""


MAX_OBJECT_BYTES = 3 * 2**19

"""1.5 MiB: the largest request the Kubernetes API server accepts for one object (etcd's default
``--max-request-bytes``); bigger documents are refused without being parsed."""

_DOC_START = re.compile(r"^---(?=[ \t\r\n]|$)", re.MULTILINE)


def _document_chunks(text: str) -> list[tuple[str, int]]:
    """The stream cut at its ``---`` lines (a document marker at column 0 ends any scalar, so this is
    where YAML cuts too): (text, line offset) per piece, each parsed on its own."""
    starts = [m.start() for m in _DOC_START.finditer(text)]
    bounds = [0, *starts] if not starts or starts[0] != 0 else starts
    out = []
    line = 0
    for i, b in enumerate(bounds):
        e = bounds[i + 1] if i + 1 < len(bounds) else len(text)
        chunk = text[b:e]
        out.append((chunk, line))
        line += chunk.count("\n")
    return out


_K8sYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}

_K8sYamlLoader.add_constructor("tag:yaml.org,2002:value", lambda loader, node: loader.construct_scalar(node))

# !!binary becomes []byte in Go and then a base64 string in JSON: keep the base64 text.
_K8sYamlLoader.add_constructor(
    "tag:yaml.org,2002:binary", lambda loader, node: "".join(loader.construct_scalar(node).split())
)


def _duplicate_keys(node: yaml.Node, path: tuple, out: list[tuple]) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, str] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
            if isinstance(key_node, yaml.ScalarNode) and key != "<<":
                mark = key_node.start_mark
                at = f"line {mark.line + 1}, column {mark.column + 1}"
                if key in seen:
                    out.append(
                        (
                            path + (key,),
                            f"duplicate field {key!r} at {at} (first at {seen[key]}); strict decoding rejects it",
                        )
                    )
                else:
                    seen[key] = at
            _duplicate_keys(value_node, path + (key,), out)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _duplicate_keys(item, path + (i,), out)


def parse_manifests(text: str) -> tuple[list[Any], list[Problem]]:
    """Parse multi-document YAML: (documents by position, empty ones as None; YAML problems).

    A syntax error stops parsing (later documents are not read) and becomes a problem of the
    document it is in; duplicate keys are problems too (kubectl's strict decoding rejects them).
    A document larger than the API server accepts (:data:`MAX_OBJECT_BYTES`) is a problem and is
    not parsed (its position holds None).
    """
    docs: list[Any] = []
    problems: list[Problem] = []
    for chunk, line0 in _document_chunks(text):
        size = len(chunk.encode("utf-8", "surrogatepass"))
        if size > MAX_OBJECT_BYTES:
            docs.append(None)
            problems.append(
                Problem(
                    len(docs),
                    "",
                    "",
                    "",
                    (
                        f"object too large: {size} bytes (from line {line0 + 1}); the Kubernetes API server "
                        "refuses objects "
                        f"over {MAX_OBJECT_BYTES} bytes (1.5 MiB, etcd's request limit), so it was not validated"
                    ),
                    "yaml",
                )
            )
            continue
        if not _parse_chunk(chunk, line0, docs, problems):
            break
    return docs, problems


def _parse_chunk(chunk: str, line0: int, docs: list[Any], problems: list[Problem]) -> bool:
    """Parse one piece of the stream into ``docs``; False after a syntax error (parsing stops)."""
    loader = _K8sYamlLoader(chunk)
    try:
        while loader.check_node():
            node = loader.get_node()
            dups: list[tuple] = []
            _duplicate_keys(node, (), dups)
            data = loader.construct_document(node)
            docs.append(data)
            if dups:
                meta = data.get("metadata") if isinstance(data, dict) and isinstance(data.get("metadata"), dict) else {}
                kind = data.get("kind", "") if isinstance(data, dict) else ""
                sink = Sink(len(docs), str(kind or ""), str(meta.get("name") or ""))
                sink.extend("yaml", [(path, _shift_lines(msg, line0)) for path, msg in dups])
                problems.extend(sink.problems)
    except (yaml.YAMLError, RecursionError) as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1 + line0}, column {mark.column + 1}: " if mark is not None else ""
        what = getattr(err, "problem", None) or str(err) or "nested too deeply"
        context = getattr(err, "context", None)
        problems.append(
            Problem(
                len(docs) + 1, "", "", "", f"invalid YAML at {where}{what}{f' ({context})' if context else ''}", "yaml"
            )
        )
        return False
    finally:
        loader.dispose()
    return True


_LINE = re.compile(r"line (\d+)")


def _shift_lines(msg: str, offset: int) -> str:
    return _LINE.sub(lambda m: f"line {int(m.group(1)) + offset}", msg) if offset else msg


def validate_text(
    text: str, crd_path: str | os.PathLike[str] | None = None, *, k8s_version: str = K8S_VERSION
) -> tuple[int, list[Problem]]:
    """Validate multi-document YAML text: (number of non-empty documents, problems)."""
    docs, problems = parse_manifests(text)
    from widep.k8s.validate.cross import RDMA_NONE_LINE, charts_of, prerequisites_of

    charts = charts_of(text)
    known = prerequisites_of(text) | set(charts)
    rdma = RDMA_NONE_LINE.search(text) is not None
    found = validate_documents(
        docs, crd_path, k8s_version=k8s_version, prerequisites=known, charts=charts, rdma_declared=rdma
    )
    if not problems and all(d is None for d in docs):
        found.append(Problem(1, "", "", "", "no documents: the input is empty or only comments", "yaml"))
    merged = sorted(problems + found, key=lambda p: p.doc)
    return sum(d is not None for d in docs), merged


def validate_file(
    path: str | os.PathLike[str], crd_path: str | os.PathLike[str] | None = None, *, k8s_version: str = K8S_VERSION
) -> list[Problem]:
    """Validate every document of a (multi-document) YAML file."""
    return validate_file_counted(path, crd_path, k8s_version=k8s_version)[1]


def validate_file_counted(
    path: str | os.PathLike[str], crd_path: str | os.PathLike[str] | None = None, *, k8s_version: str = K8S_VERSION
) -> tuple[int, list[Problem]]:
    """Like :func:`validate_file`, also returning the number of non-empty documents."""
    from widep.spec.safeyaml import read_text

    text = read_text(path, "--validate")
    return validate_text(text, crd_path, k8s_version=k8s_version)
