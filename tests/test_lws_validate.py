"""The LeaderWorkerSet manifest validator (widep.k8s.validate) and ``widep lws --validate``.

Real components only: the real LWS v0.10.0 CRD and upstream example manifests from
../shared/schemas (never copied into the project), jsonschema, and kubernetes-validate's bundled
Kubernetes schemas. No API server can run on this machine kind (see docs/architecture.md), so the webhook
rules are the re-implementation under test, checked against hand-written negative cases in
tests/data/lws-negative/ whose ``# expect:`` header lines say exactly which problems must appear.
"""

from __future__ import annotations

import copy
import json
import re
import time
from decimal import Decimal
from pathlib import Path

import pytest
import yaml

from widep.cli import main
from widep.errors import UserError
from widep.k8s import names
from widep.k8s import validate as v
from widep.k8s.validate import crd as crd_module

SHARED = Path(__file__).parents[1].parent / "shared/schemas"
CRD = SHARED / "lws-crd-v0.10.0.yaml"
UPSTREAM = SHARED / "lws-upstream-examples"
NEGATIVE = Path(__file__).parent / "data" / "lws-negative"
UPSTREAM_FILES = sorted(UPSTREAM.glob("*.yaml"))
NEGATIVE_FILES = sorted(NEGATIVE.glob("*.yaml"))

BASE = yaml.safe_load(
    """
apiVersion: leaderworkerset.x-k8s.io/v1
kind: LeaderWorkerSet
metadata:
  name: vllm
spec:
  replicas: 2
  leaderWorkerTemplate:
    size: 2
    workerTemplate:
      spec:
        containers:
        - name: vllm
          image: vllm/vllm-openai:v0.8.5
"""
)


@pytest.fixture(scope="session")
def crd() -> Path:
    if not CRD.is_file():
        pytest.fail(f"the LWS CRD must be at {CRD} (../shared/schemas next to the repository)")
    v.load_crds(CRD)  # build the validators once per session
    v.core_schemas()
    return CRD


def failing(problems: list[v.Problem]) -> list[v.Problem]:
    return [p for p in problems if p.failing]


def lws(**changes) -> dict:
    """BASE with dotted-path changes, e.g. lws(**{"spec.replicas": 3})."""
    doc = copy.deepcopy(BASE)
    for dotted, value in changes.items():
        node = doc
        *parents, last = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[last] = value
    return doc


# --------------------------------------------------------------------------------------------
# upstream examples


def test_upstream_examples_present():
    assert len(UPSTREAM_FILES) == 13, [f.name for f in UPSTREAM_FILES]


@pytest.mark.parametrize("path", UPSTREAM_FILES, ids=lambda p: p.name)
def test_upstream_example_passes(crd, path):
    count, problems = v.validate_file_counted(path, crd)
    # upstream examples read Secrets they expect in the cluster: the cross-object check notes them (not failing)
    undeclared = [p for p in problems if p.layer == "cross-object" and p.severity == "note"]
    assert all("is neither in this file nor a declared prerequisite" in p.message for p in undeclared)
    problems = [p for p in problems if p not in undeclared]
    assert problems == [], "\n".join(p.format(path.name) for p in problems)
    assert count == sum(1 for d in yaml.safe_load_all(path.read_text()) if d)


def test_all_upstream_examples_are_fast(crd):
    start = time.perf_counter()
    documents = sum(v.validate_file_counted(path, crd)[0] for path in UPSTREAM_FILES)
    elapsed = time.perf_counter() - start
    assert documents == 19
    assert elapsed < 5, f"validating {documents} upstream documents took {elapsed:.2f} s"


def test_validators_are_built_once(crd):
    assert v.load_crds(crd) is v.load_crds(str(crd))
    assert v.core_schemas() is v.core_schemas(v.K8S_VERSION)


# --------------------------------------------------------------------------------------------
# negative cases: every "# expect:" line must appear, and nothing else may fail

_EXPECT = re.compile(r"#\s*expect(-warning)?:\s*(\d+)\s+(.*?)\s*~\s*(.+?)\s*$")


def expectations(path: Path) -> list[tuple[int, str, str, str]]:
    out = []
    for line in path.read_text().splitlines():
        m = _EXPECT.match(line)
        if m:
            severity = "warning" if m.group(1) else "error"
            out.append((int(m.group(2)), m.group(3), severity, m.group(4).replace("\\n", "\n").replace("\n", "\\n")))
    return out


def test_negative_cases_present():
    assert len(NEGATIVE_FILES) >= 50
    for path in NEGATIVE_FILES:
        assert expectations(path), f"{path.name} has no '# expect:' line"


@pytest.mark.parametrize("path", NEGATIVE_FILES, ids=lambda p: p.stem)
def test_negative_case_caught(crd, path):
    problems = failing(v.validate_file(path, crd))
    shown = "\n".join(f"  [{p.layer}] {p.severity} {p.format(path.name)}" for p in problems)
    expected = expectations(path)
    for doc, where, severity, text in expected:
        hits = [p for p in problems if p.doc == doc and p.path == where and p.severity == severity]
        assert any(text in p.message for p in hits), (
            f"missing {severity} at doc {doc} {where!r} ~ {text!r}; got:\n{shown}"
        )
    wanted = {(doc, where, severity) for doc, where, severity, _ in expected}
    extra = [p for p in problems if (p.doc, p.path, p.severity) not in wanted]
    assert not extra, f"unexpected problems:\n{shown}"


# --------------------------------------------------------------------------------------------
# things that must pass (each near a rule boundary)


@pytest.mark.parametrize(
    "changes",
    [
        {"spec.replicas": None},  # null -> CRD default 1
        {"spec.replicas": 0, "spec.rolloutStrategy": {"rollingUpdateConfiguration": {"maxUnavailable": 0}}},
        {"spec.rolloutStrategy": {"rollingUpdateConfiguration": {"maxSurge": 1}}},  # type defaulted
        {"spec.rolloutStrategy": {"rollingUpdateConfiguration": {"maxUnavailable": 0, "maxSurge": "100%"}}},
        {"spec.rolloutStrategy": {"rollingUpdateConfiguration": {"maxUnavailable": "50%", "maxSurge": 0}}},
        {"spec.leaderWorkerTemplate.size": 1},
        {
            "spec.leaderWorkerTemplate.size": 5,
            "spec.leaderWorkerTemplate.subGroupPolicy": {"subGroupPolicyType": "LeaderExcluded", "subGroupSize": 4},
        },
        {"spec.leaderWorkerTemplate.size": 8, "spec.leaderWorkerTemplate.subGroupPolicy": {"subGroupSize": 4}},
        {"spec.leaderWorkerTemplate.size": 9, "spec.leaderWorkerTemplate.subGroupPolicy": {"subGroupSize": 4}},
        {"spec.leaderWorkerTemplate.restartPolicy": "RecreateGroupAfterStart", "spec.startupPolicy": "LeaderReady"},
        {"spec.networkConfig": {"subdomainPolicy": "UniquePerReplica"}},
        {"spec.replicas": 1000000, "spec.leaderWorkerTemplate.size": 2147},
        {"metadata.name": "a" * 52, "spec.replicas": 1, "spec.leaderWorkerTemplate.size": 1},
        {"metadata.name": "a" * 50, "spec.replicas": 10, "spec.leaderWorkerTemplate.size": 10},
        {"metadata.annotations": {names.EXCLUSIVE_TOPOLOGY: "kubernetes.io/hostname"}},
        {"metadata.creationTimestamp": None, "metadata.labels": {"app.kubernetes.io/name": "vllm"}},
    ],
    ids=lambda c: ",".join(f"{k.split('.')[-1]}" for k in c),
)
def test_boundary_values_pass(crd, changes):
    problems = v.validate_documents([lws(**changes)], crd)
    assert failing(problems) == [], [p.format() for p in problems]


def test_name_length_limits(crd):
    """63 characters is a valid LWS name (DNS-1035), but its StatefulSet's pods may not be creatable."""
    (warning,) = v.validate_documents(
        [lws(**{"metadata.name": "a" * 63, "spec.replicas": 1, "spec.leaderWorkerTemplate.size": 1})], crd
    )
    assert (warning.path, warning.severity, warning.layer) == ("metadata.name", "warning", "lws-controller")
    (error,) = v.validate_documents([lws(**{"metadata.name": "a" * 64})], crd)
    assert (error.path, error.severity, error.layer) == ("metadata.name", "error", "object-meta")


def test_integer_quantities_are_allowed(crd):
    """Quantities are int-or-string in the CRD (cpu: 125 in the upstream vLLM example)."""
    doc = lws()
    doc["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["resources"] = {
        "limits": {"cpu": 125, "memory": "1124Gi", "nvidia.com/gpu": 8},
        "requests": {"cpu": 125, "nvidia.com/gpu": "8"},
    }
    assert v.validate_documents([doc], crd) == []


def test_float_quantity_rejected_in_lws_but_not_in_deployment(crd):
    """The CRD's quantity is x-kubernetes-int-or-string: a YAML float (cpu: 0.5) fails there, while a
    built-in Deployment accepts it (its Quantity is number-or-string)."""
    doc = lws()
    container = doc["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]
    container["resources"] = {"requests": {"cpu": 0.5}}
    problems = v.validate_documents([doc], crd)
    assert [(p.path, p.layer) for p in problems] == [
        ("spec.leaderWorkerTemplate.workerTemplate.spec.containers[0].resources.requests.cpu", "crd-schema")
    ]
    assert "expected integer or string, given number 0.5" in problems[0].message
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "router"},
        "spec": {
            "selector": {"matchLabels": {"app": "router"}},
            "template": {
                "metadata": {"labels": {"app": "router"}},
                "spec": {"containers": [{"name": "router", "image": "nginx", "resources": {"requests": {"cpu": 0.5}}}]},
            },
        },
    }
    assert v.validate_documents([deployment], crd) == []


def test_one_mistake_is_reported_once(crd):
    """containerPort "8080" violates both the CRD schema and the core PodTemplate schema."""
    doc = lws()
    doc["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]["ports"] = [
        {"containerPort": "8080"}
    ]
    problems = v.validate_documents([doc], crd)
    assert len(problems) == 1 and problems[0].layer == "crd-schema"


def test_core_schema_layer_checks_wrapped_templates():
    """Layer (c) alone: a template wrapped as PodTemplate against kubernetes-validate's schema."""
    validator = v.core_schemas().validator("v1", "PodTemplate")
    template = {"spec": {"containers": [{"name": "x", "image": "y", "ports": [{"containerPort": "80"}], "gpu": 1}]}}
    found = v.schema_problems(validator, v.wrap_pod_template(template))
    assert {v.format_path(p) for p, _ in found} == {
        "template.spec.containers[0].gpu",
        "template.spec.containers[0].ports[0].containerPort",
    }


def test_core_layer_agrees_with_kubernetes_validate():
    """Layer (c) uses kubernetes-validate's bundled schemas through a cached validator that reports
    every error; its own entry point (first error only) must agree on what is wrong."""
    import kubernetes_validate

    good = {"spec": {"containers": [{"name": "x", "image": "y", "ports": [{"containerPort": 80}]}]}}
    kubernetes_validate.validate(v.wrap_pod_template(good), v.K8S_VERSION, strict=True)
    assert v.schema_problems(v.core_schemas().validator("v1", "PodTemplate"), v.wrap_pod_template(good)) == []
    bad = copy.deepcopy(good)
    bad["spec"]["containers"][0]["ports"][0]["containerPort"] = "80"
    with pytest.raises(kubernetes_validate.ValidationError) as caught:
        kubernetes_validate.validate(v.wrap_pod_template(bad), v.K8S_VERSION, strict=True)
    ours = v.schema_problems(v.core_schemas().validator("v1", "PodTemplate"), v.wrap_pod_template(bad))
    assert [path for path, _ in ours] == [tuple(caught.value.path)]


def test_schema_defaults_are_applied_before_validation(crd):
    crd_kind = v.load_crds(crd).lookup("leaderworkerset.x-k8s.io/v1", "LeaderWorkerSet")
    doc = lws(**{"spec.rolloutStrategy": {"rollingUpdateConfiguration": {}}, "spec.replicas": None})
    out = v.apply_schema_defaults(crd_kind.schema, copy.deepcopy(doc))
    assert out["spec"]["replicas"] == 1
    assert out["spec"]["startupPolicy"] == "LeaderCreated"
    assert out["spec"]["rolloutStrategy"] == {
        "type": "RollingUpdate",
        "rollingUpdateConfiguration": {"maxUnavailable": 1, "maxSurge": 0, "partition": 0},
    }
    assert out["spec"]["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"


def test_unknown_custom_kind_is_a_note_not_a_pass(crd):
    queue = {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "ClusterQueue", "metadata": {"name": "q"}}
    gateway = {"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"name": "r"}}
    problems = v.validate_documents([queue, None, gateway], crd)
    assert [(p.doc, p.severity, p.layer) for p in problems] == [(1, "note", "not-checked"), (3, "note", "not-checked")]
    assert "not checked" in problems[0].message and "ClusterQueue" in problems[0].message


def test_status_is_ignored_with_a_note(crd):
    problems = v.validate_documents([lws(status={"replicas": "x", "bogus": 1})], crd)
    assert [(p.path, p.severity) for p in problems] == [("status", "note")]


def test_deprecated_default_restart_policy_is_a_note(crd):
    problems = v.validate_documents([lws(**{"spec.leaderWorkerTemplate.restartPolicy": "Default"})], crd)
    assert [(p.path, p.severity) for p in problems] == [("spec.leaderWorkerTemplate.restartPolicy", "note")]
    assert "None" in problems[0].message


def test_missing_api_version_and_kind(crd):
    problems = v.validate_documents([{"metadata": {"name": "x"}}, "just a string"], crd)
    assert [(p.doc, p.path) for p in problems] == [(1, "apiVersion"), (1, "kind"), (2, "")]


def test_yaml_timestamps_stay_strings(crd):
    text = (CRD.parent / "lws-upstream-examples" / "sample_lws.yaml").read_text()
    text = text.replace("metadata:\n", "metadata:\n  annotations:\n    built: 2024-01-02\n", 1)
    count, problems = v.validate_text(text, crd)
    assert count == 1 and problems == []


def test_yaml_binary_and_empty_input(crd):
    count, problems = v.validate_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\nbinaryData: {a: !!binary aGVsbG8=}\n", crd
    )
    assert count == 1 and problems == []
    count, problems = v.validate_text("# only a comment\n---\n", crd)
    assert count == 0 and [p.message for p in problems] == ["no documents: the input is empty or only comments"]


def _paths(node, prefix=()):
    yield prefix
    children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in children:
        yield from _paths(child, prefix + (key,))


def test_any_shape_gives_problems_not_exceptions(crd):
    """Replace every node of a two-document upstream example by values of the wrong shape: the
    validator must report problems, never raise."""
    docs = list(yaml.safe_load_all((UPSTREAM / "sample_lws-volume-claim-templates.yaml").read_text()))
    runs = 0
    for index, doc in enumerate(docs):
        for path in _paths(doc):
            for value in (None, [], {}, "x", -1, 2**40):
                mutated = copy.deepcopy(docs)
                if not path:
                    mutated[index] = value
                else:
                    node = mutated[index]
                    for key in path[:-1]:
                        node = node[key]
                    node[path[-1]] = value
                assert all(isinstance(p, v.Problem) for p in v.validate_documents(mutated, crd))
                runs += 1
    assert runs > 200


# --------------------------------------------------------------------------------------------
# helpers


def test_go_regex_anchors():
    assert v.go_regex(names.QUANTITY_PATTERN).search("8Gi")
    assert not v.go_regex(names.QUANTITY_PATTERN).search("8Gi\n")
    assert re.search(names.QUANTITY_PATTERN, "8Gi\n")  # why the translation exists
    assert v.go_regex(r"^a[$]b$").search("a$b")


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("500m", "0.5"),
        ("16Gi", str(16 * 2**30)),
        ("1e3", "1000"),
        (8, "8"),
        ("1.5", "1.5"),
        ("2k", "2000"),
        ("eight", None),
        ("8Gi\n", None),
    ],
)
def test_parse_quantity(text, value):
    q = v.parse_quantity(text)
    assert (q if q is None else q.normalize()) == (None if value is None else Decimal(value).normalize())


def test_problem_format():
    p = v.Problem(2, "Service", "vllm-leader", "spec.ports[0].port", "bad", "core-rules")
    assert p.format("x.yaml") == "x.yaml: doc 2 (Service/vllm-leader): spec.ports[0].port: bad"
    w = v.Problem(1, "LeaderWorkerSet", "", "", "hm", "lws-controller", "warning")
    assert w.format() == "doc 1 (LeaderWorkerSet/?): warning: hm"
    assert v.format_path(["spec", "limits", "nvidia.com/gpu", 0]) == "spec.limits[nvidia.com/gpu][0]"


# --------------------------------------------------------------------------------------------
# default_crd_path


def test_default_crd_path_env(monkeypatch, tmp_path, crd):
    monkeypatch.setenv(v.CRD_ENV, str(crd))
    assert v.default_crd_path() == crd
    monkeypatch.setenv(v.CRD_ENV, str(tmp_path / "missing.yaml"))
    with pytest.raises(UserError, match=v.CRD_ENV):
        v.default_crd_path()


def test_default_crd_path_is_the_shipped_copy(monkeypatch, tmp_path, crd):
    monkeypatch.delenv(v.CRD_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    path = v.default_crd_path()
    assert path == v.packaged_crd() and path.parent.name == "data" and path.read_bytes() == crd.read_bytes()


def test_default_crd_path_missing_from_the_installation(monkeypatch, tmp_path):
    monkeypatch.delenv(v.CRD_ENV, raising=False)
    monkeypatch.setattr(crd_module, "CRD_FILE_NAME", "no-such-crd.yaml")
    with pytest.raises(UserError, match="--crd"):
        v.default_crd_path()


def test_crd_file_that_is_not_a_crd(tmp_path):
    bogus = tmp_path / "crd.yaml"
    bogus.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    with pytest.raises(UserError, match="defines no served CustomResourceDefinition"):
        v.load_crds(bogus)


# --------------------------------------------------------------------------------------------
# the CLI


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["lws", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_upstream_directory_ok(capsys, crd):
    code, out, err = run_cli(capsys, "--validate", str(UPSTREAM), "--crd", str(crd))
    assert code == 0, out + err
    # notes do not fail: the DeepSeek example reads Secret hf-secret, which it expects in the cluster
    assert out.strip().splitlines()[-1] == "ok: 19 documents (2 notes)"
    assert out.count("Secret/hf-secret is neither in this file nor a declared prerequisite") == 2


def test_cli_reports_problems_and_exits_1(capsys, crd):
    bad = NEGATIVE / "service-bad-ports.yaml"
    good = UPSTREAM / "sample_lws.yaml"
    code, out, err = run_cli(capsys, "--validate", str(good), "--validate", str(bad), "--crd", str(crd))
    assert code == 1
    lines = out.strip().splitlines()
    assert len(lines) == len(expectations(bad))
    line = re.compile(
        r"^(?P<file>[^:]+): doc (?P<doc>\d+) \((?P<kind>\w+)/(?P<name>[^)]*)\): (?P<path>[^:]+): (?P<msg>.+)$"
    )
    for text in lines:
        m = line.match(text)
        assert m, text
        assert m["file"] == str(bad) and m["kind"] == "Service" and m["name"] == "vllm.leader"
    assert any(": spec.ports[1].port: " in text for text in lines)
    assert err.strip() == f"{len(lines)} problems in 2 documents"


def test_cli_json(capsys, crd):
    bad = NEGATIVE / "webhook-size-zero.yaml"
    code, out, _ = run_cli(capsys, "--validate", str(bad), "--crd", str(crd), "--json")
    assert code == 1
    data = json.loads(out)
    assert data["ok"] is False and data["documents"] == 1
    (entry,) = data["files"]
    assert entry["file"] == str(bad)
    assert [(p["path"], p["layer"], p["severity"]) for p in entry["problems"]] == [
        ("spec.leaderWorkerTemplate.size", "lws-webhook", "error")
    ]


def test_cli_notes_do_not_fail(capsys, crd, tmp_path):
    f = tmp_path / "queue.yaml"
    f.write_text("apiVersion: kueue.x-k8s.io/v1beta1\nkind: ClusterQueue\nmetadata:\n  name: q\n")
    code, out, _ = run_cli(capsys, "--validate", str(f), "--crd", str(crd))
    assert code == 0
    assert "note: not checked" in out and "ok: 1 document (1 note)" in out


def test_cli_default_crd(capsys, monkeypatch, crd):
    monkeypatch.setenv(v.CRD_ENV, str(crd))
    code, out, _ = run_cli(capsys, "--validate", str(UPSTREAM / "sglang_lws.yaml"))
    assert code == 0 and out.strip() == "ok: 2 documents"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--validate", "/nonexistent/lws.yaml"], "manifest file not found"),
        (["--validate", "UPSTREAM", "--crd", "/nonexistent/crd.yaml"], "CRD file not readable"),
        ([], "nothing to do"),
        (["topologies/deepseek-r1.yaml"], "not found"),
    ],
)
def test_cli_usage_errors_exit_2(capsys, args, message):
    args = [str(UPSTREAM) if a == "UPSTREAM" else a for a in args]
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    assert message in err and out == ""
