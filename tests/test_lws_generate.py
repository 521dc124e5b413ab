"""LeaderWorkerSet generation (widep.k8s.lws, ``widep lws TOPOLOGY``, ``python -m widep.k8s.regen``).

Real components: the planner and renderer, the real LWS v0.10.0 CRD and the validator built on
it (read from ../shared/schemas, never copied), real bash running the pods' scripts, real HTTP
servers for the probe script. No API server, kubelet or GPU can run on this machine kind (see
docs/architecture.md), so two things are stand-ins, each said where it is used:

* the kubelet: the pod's container is started as the kubelet would start it — ``command + args``
  after the kubelet's ``$(VAR)`` expansion, with the container's ``env`` resolved (downward-API
  pod IP, Secret references) and the three variables the LWS pod webhook injects;
* vLLM: ``vllm`` and ``python`` on the pod's PATH are shims that record their argv and
  environment (real vLLM cannot start DeepSeek-R1 here). What they record is compared with
  ``widep render`` for the same ranks.
"""

from __future__ import annotations

import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from kubelet import kubelet_expand

from widep.cli import main
from widep.errors import UserError
from widep.k8s import lws as L
from widep.k8s import regen
from widep.k8s import validate as v
from widep.k8s.resources import start_budget_s
from widep.plan import plan as make_plan
from widep.render.vllm import EnvRef, RenderContext, render_role
from widep.spec.topology import load_topology, parse_topology

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "schemas"
CRD = SHARED / "lws-crd-v0.10.0.yaml"
TOPOLOGIES = sorted((REPO / "topologies").glob("*.yaml"))
NAMESPACE = "llm"


@pytest.fixture(scope="session")
def crd() -> Path:
    if not CRD.is_file():
        pytest.fail(f"the LWS CRD must be at {CRD} (../shared/schemas next to the repository)")
    v.load_crds(CRD)
    v.core_schemas()
    return CRD


def variant(path: str, **changes) -> dict:
    """A curated topology as a dict, with dotted-path changes (``roles.0.tp``)."""
    doc = yaml.safe_load((REPO / "topologies" / path).read_text())
    for dotted, value in changes.items():
        node = doc
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return doc


def plan_of(doc_or_path) -> object:
    if isinstance(doc_or_path, Path):
        return make_plan(load_topology(doc_or_path))
    return make_plan(parse_topology(doc_or_path, "(test)"))


# Curated topologies, and variants for what they do not cover: the other DP modes, TP > 1 with a
# pod per rank, a role on GPUs 2-3 of a node, secrets, several replicas.
VARIANTS = {
    "decode-2x8-hybrid": variant("deepseek-r1-decode-2x8-h200.yaml", **{"serving.dp_mode": "hybrid"}),
    "decode-2x8-internal": variant("deepseek-r1-decode-2x8-h200.yaml", **{"serving.dp_mode": "internal"}),
    "decode-2x8-multiport": variant("deepseek-r1-decode-2x8-h200.yaml", **{"serving.dp_mode": "multiport"}),
    "pd-3x8-internal": variant("deepseek-r1-pd-3x8-h200.yaml", **{"serving.dp_mode": "internal"}),
    "cpu-dp2-internal": variant("tiny-moe-cpu-dp2.yaml", **{"serving.dp_mode": "internal"}),
    "cpu-dp2-hybrid": variant("tiny-moe-cpu-dp2.yaml", **{"serving.dp_mode": "hybrid"}),
    "qwen-tp2-4gpu": variant("qwen3-30b-a3b-1x2-h100.yaml", **{"cluster.gpus_per_node": 4, "roles.0.tp": 2}),
    "qwen-gpus-2-3": variant(
        "qwen3-30b-a3b-1x2-h100.yaml",
        **{"cluster.gpus_per_node": 4, "roles.0.first_gpu": 2, "roles.0.gpus_per_node": 2},
    ),
    # issue #20: hostile strings reach the pod's processes intact, nothing is executed or substituted by the kubelet
    "cpu-dp2-hostile-strings": variant(
        "tiny-moe-cpu-dp2.yaml",
        **{
            "roles.0.extra_args": [
                "--chat-template",
                "$(touch PWNED) `id` $(POD_IP) $$ 'q' \"d\" \\ *",
                "--revision=$(HF_TOKEN)",
            ],
            "roles.0.extra_env": {"MY_VAR": "$(POD_IP) ${HOME} $$(x) ; touch PWNED"},
            "model.served_model_name": "a b'c",
            "description": "x\n---\nkind: ConfigMap",
        },
    ),
    "qwen-2-replicas-secrets": variant(
        "qwen3-30b-a3b-1x2-h100.yaml",
        **{
            "cluster.nodes": 2,
            "roles.0.replicas": 2,
            "serving.hf_token_secret": "hf-secret",
            "serving.api_key_secret": "vllm-api-key",
        },
    ),
}


def cases() -> list[tuple[str, object, str]]:
    out = []
    for path in TOPOLOGIES:
        p = plan_of(path)
        for placement in L.sensible_placements(p):
            out.append((f"{path.stem}:{placement}", path, placement))
    for name, doc in VARIANTS.items():
        for placement in L.sensible_placements(plan_of(doc)):
            out.append((f"{name}:{placement}", doc, placement))
    return out


CASES = cases()
CASE_IDS = [c[0] for c in CASES]


# --------------------------------------------------------------------------------------------
# every generated manifest validates


@pytest.mark.parametrize(("name", "source", "placement"), CASES, ids=CASE_IDS)
def test_generated_manifests_validate(crd, name, source, placement):
    p = plan_of(source)
    pd = {rp.kind for rp in p.roles} >= {"prefill", "decode"}
    try:
        docs = L.render_lws(p, namespace=NAMESPACE, placement=placement, inference_pool=True)
        pool = True
    except UserError:  # llm-d's routing sidecar cannot front this P/D topology (regen skips it too): its router
        if not pd:
            raise
        docs = L.render_lws(p, namespace=NAMESPACE, placement=placement)
        pool = False
    count, problems = v.validate_text(L.dump_manifests(docs, L.prerequisite_lines(docs)), crd)
    assert [pr.format() for pr in problems if pr.failing] == []
    # every object is checked: InferencePools against the shipped GAIE CRD, none is "not checked"
    assert problems == []
    if pd and not pool:  # LWS + Service per role; router Deployment + Service
        assert count == 2 * len(p.roles) + (2 if p.router else 0)
    elif pd:  # --inference-pool on P/D: llm-d's one pool, which the router chart creates (issue 28 defect 1)
        assert count == 2 * len(p.roles)
        assert "InferencePool" not in {d["kind"] for d in docs}
        assert L.router_values_for(p, docs, placement=placement)["router"]["modelServers"]["targetPorts"]
    else:  # LWS, Service, pool per role; router Deployment + Service
        assert count == 3 * len(p.roles) + (2 if p.router else 0)


OPTION_SETS = {
    "defaults": {},
    "exclusive-block": {"exclusive_topology": "cloud.google.com/gce-topology-block"},
    "pvc-cache-no-rdma": {"model_cache": "pvc:hf-cache", "rdma_resource": None},
    "emptydir-cpu-memory": {"model_cache": "emptydir", "cpu": "32", "memory": "512Gi", "shm_size": "16Gi"},
    "roce-products": {
        "rdma_resource": "rdma/roce_gdr",
        "gpu_products": ("NVIDIA-H200", "NVIDIA-H200-141GB-HBM3e"),
        "gpu_product_label": "gpu.nvidia.com/model",
    },
    "no-affinity": {"gpu_product_label": None, "gpu_resource": "amd.com/gpu", "termination_grace_s": 0},
}


@pytest.mark.parametrize("options", OPTION_SETS.values(), ids=OPTION_SETS.keys())
@pytest.mark.parametrize("path", TOPOLOGIES, ids=lambda p: p.stem)
def test_option_sets_validate(crd, path, options):
    p = plan_of(path)
    docs = L.render_lws(p, image="ghcr.io/example/vllm:1.2.3", **options)
    text = L.dump_manifests(docs, L.prerequisite_lines(docs))
    _, problems = v.validate_text(text, crd)
    assert [pr.format() for pr in problems if pr.failing] == []
    assert "ghcr.io/example/vllm:1.2.3" in text


def lws_docs(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d["kind"] == "LeaderWorkerSet"]


def templates(doc: dict) -> list[dict]:
    lwt = doc["spec"]["leaderWorkerTemplate"]
    return [lwt[k] for k in ("leaderTemplate", "workerTemplate") if k in lwt]


def test_pod_spec_for_gpu_clusters():
    p = plan_of(REPO / "topologies" / "deepseek-r1-pd-3x8-h200.yaml")
    docs = L.render_lws(p, exclusive_topology="cloud.google.com/gce-topology-block", provider="coreweave")
    assert [(d["kind"], d["metadata"]["name"]) for d in docs] == [
        ("LeaderWorkerSet", "deepseek-r1-pd-3x8-h200-prefill"),
        ("Service", "deepseek-r1-pd-3x8-h200-prefill-api"),
        ("LeaderWorkerSet", "deepseek-r1-pd-3x8-h200-decode"),
        ("Service", "deepseek-r1-pd-3x8-h200-decode-api"),
        ("Deployment", "deepseek-r1-pd-3x8-h200-router"),  # P/D: a front door by default
        ("Service", "deepseek-r1-pd-3x8-h200-router"),
    ]
    for doc, rp in zip(lws_docs(docs), p.roles, strict=False):
        spec = doc["spec"]
        assert spec["replicas"] == rp.spec.replicas
        assert spec["leaderWorkerTemplate"]["size"] == rp.nodes_per_group
        assert spec["leaderWorkerTemplate"]["restartPolicy"] == "RecreateGroupOnPodRestart"
        assert doc["metadata"]["annotations"] == {
            "leaderworkerset.sigs.k8s.io/exclusive-topology": "cloud.google.com/gce-topology-block"
        }
        (tpl,) = templates(doc)
        pod = tpl["spec"]
        (c,) = pod["containers"]
        limits = c["resources"]["limits"]
        assert {k: limits[k] for k in ("nvidia.com/gpu", "rdma/ib")} == {"nvidia.com/gpu": "8", "rdma/ib": "1"}
        assert limits == c["resources"]["requests"]  # Guaranteed
        assert c["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "capabilities": {"drop": ["ALL"], "add": ["IPC_LOCK", "SYS_RAWIO"]},
        }
        assert "privileged" not in yaml.safe_dump(doc)
        vols = {vol["name"]: vol for vol in pod["volumes"]}
        assert vols["dshm"]["emptyDir"]["medium"] == "Memory"
        assert vols["model-cache"]["hostPath"]["path"] == "/mnt/local/hf-cache"
        assert {m["mountPath"] for m in c["volumeMounts"]} == {"/dev/shm", "/var/cache/huggingface", "/var/cache/vllm"}
        env = {e["name"]: e for e in c["env"]}
        assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
        assert env["NVSHMEM_REMOTE_TRANSPORT"]["value"] == "ibgda"
        assert env["GLOO_SOCKET_IFNAME"]["value"] == env["NCCL_SOCKET_IFNAME"]["value"] == "eth0"
        ports = [(cp["name"], cp["containerPort"]) for cp in c["ports"]]
        assert ports == [(f"rank-{i}", rp.http_port + i) for i in range(8)]
        # long starts: the startup probe waits the role's start budget (DeepSeek-R1: ~45 min)
        startup = c["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] == start_budget_s(p, rp) >= 2400
        assert c["readinessProbe"]["exec"] == c["livenessProbe"]["exec"] == startup["exec"]
        assert startup["exec"]["command"][-1] == L.health_check_script(
            "127.0.0.1", [rp.http_port + i for i in range(8)]
        )
        terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert terms == [{"matchExpressions": [{"key": "gpu.nvidia.com/model", "operator": "In", "values": ["H200"]}]}]
        assert pod["terminationGracePeriodSeconds"] == 120 and pod["enableServiceLinks"] is False
        assert tpl["metadata"]["labels"]["llm-d.ai/role"] == rp.kind
    services = [d for d in docs if d["kind"] == "Service"]
    for svc, rp in zip(services, p.roles, strict=False):
        name = f"deepseek-r1-pd-3x8-h200-{rp.name}"
        assert svc["spec"]["selector"] == {"leaderworkerset.sigs.k8s.io/name": name}
        assert [pt["port"] for pt in svc["spec"]["ports"]] == [rp.http_port + i for i in range(8)]


def test_one_inference_pool_per_role_outside_pd():
    p = plan_of(REPO / "topologies" / "deepseek-r1-decode-2x8-h200.yaml")
    docs = L.render_lws(p, inference_pool=True)
    (svc,) = [d for d in docs if d["kind"] == "Service"]
    (pool,) = [d for d in docs if d["kind"] == "InferencePool"]
    name = "deepseek-r1-decode-2x8-h200-decode"
    assert pool["apiVersion"] == "inference.networking.k8s.io/v1"
    assert pool["spec"]["selector"] == {"matchLabels": svc["spec"]["selector"]}
    assert [t["number"] for t in pool["spec"]["targetPorts"]] == [pt["port"] for pt in svc["spec"]["ports"]]
    assert pool["spec"]["endpointPickerRef"] == {
        "name": f"{name}-epp",
        "port": {"number": 9002},
        "failureMode": "FailOpen",
    }
    with pytest.raises(UserError, match="--front-door llm-d"):  # per-role pools cannot route P/D
        L.render_lws(
            plan_of(REPO / "topologies" / "deepseek-r1-pd-3x8-h200.yaml"), inference_pool=True, front_door="router"
        )


def test_cpu_topology_has_no_gpu_resources():
    p = plan_of(REPO / "topologies" / "tiny-moe-cpu-dp2.yaml")
    (doc,) = lws_docs(L.render_lws(p))
    (tpl,) = templates(doc)
    pod = tpl["spec"]
    (c,) = pod["containers"]
    assert (
        c["resources"]["requests"]
        == c["resources"]["limits"]
        == {"cpu": "1", "memory": "6Gi", "ephemeral-storage": "16Gi"}
    )
    assert "affinity" not in pod and "tolerations" not in pod
    assert c["securityContext"] == {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    assert c["startupProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert c["startupProbe"]["failureThreshold"] * 10 == p.spec.vllm.ready_timeout_s  # the topology sets it


def test_internal_mode_serves_from_the_leader_only():
    p = plan_of(VARIANTS["decode-2x8-internal"])
    docs = L.render_lws(p, inference_pool=True)
    (doc,) = lws_docs(docs)
    leader, worker = templates(doc)
    assert "ports" in leader["spec"]["containers"][0] and "startupProbe" in leader["spec"]["containers"][0]
    assert "ports" not in worker["spec"]["containers"][0] and "startupProbe" not in worker["spec"]["containers"][0]
    svc = next(d for d in docs if d["kind"] == "Service")
    assert svc["spec"]["selector"]["leaderworkerset.sigs.k8s.io/worker-index"] == "0"
    pool = next(d for d in docs if d["kind"] == "InferencePool")
    assert pool["spec"]["selector"]["matchLabels"] == svc["spec"]["selector"]


def test_multiport_probes_the_supervisor():
    p = plan_of(VARIANTS["decode-2x8-multiport"])
    (doc,) = lws_docs(L.render_lws(p))
    (c,) = templates(doc)[0]["spec"]["containers"]
    assert c["startupProbe"]["httpGet"] == {"path": "/health", "port": "supervisor"}
    assert ("supervisor", p.spec.serving.supervisor_port) in [(cp["name"], cp["containerPort"]) for cp in c["ports"]]


# --------------------------------------------------------------------------------------------
# secrets by reference


def test_secrets_are_references(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "s3cr3t-hf-value")
    monkeypatch.setenv("hf-secret", "s3cr3t-hf-value")
    monkeypatch.setenv("VLLM_API_KEY", "s3cr3t-api-value")
    p = plan_of(VARIANTS["qwen-2-replicas-secrets"])
    docs = L.render_lws(p)
    text = L.dump_manifests(docs)
    assert "s3cr3t" not in text
    (c,) = templates(lws_docs(docs)[0])[0]["spec"]["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-secret", "key": "token"}}}
    assert env["VLLM_API_KEY"] == {
        "name": "VLLM_API_KEY",
        "valueFrom": {"secretKeyRef": {"name": "vllm-api-key", "key": "api-key"}},
    }
    # the bare-metal form ${name} of a reference must not leak into the pod script
    assert "${hf-secret}" not in c["args"][0] and "${vllm-api-key}" not in c["args"][0]
    assert all("value" not in e for e in c["env"] if "valueFrom" in e)


# --------------------------------------------------------------------------------------------
# the kubelet's $(VAR) expansion (a re-implementation of k8s third_party/forked/golang/expansion)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("$(VAR_A)", "A"),
        ("___$(VAR_A)___", "___A___"),
        ("$(VAR_A)$(VAR_B)", "AB"),
        ("$$(VAR_A)", "$(VAR_A)"),
        ("$$$(VAR_A)", "$A"),
        ("$(UNKNOWN)", "$(UNKNOWN)"),
        ("${VAR_A}", "${VAR_A}"),
        ("$((W * 8 + 1))", "$((W * 8 + 1))"),
        ("$(VAR_A", "$(VAR_A"),
        ("$", "$"),
        ("a$b", "a$b"),
        ("$(VAR_EMPTY)x", "x"),
    ],
)
def test_kubelet_expand(text, expected):
    assert kubelet_expand(text, {"VAR_A": "A", "VAR_B": "B", "VAR_EMPTY": ""}) == expected


# --------------------------------------------------------------------------------------------
# the per-worker command check: run every pod's script, compare with `widep render`

SHIM = r"""#!/bin/bash
# Test stand-in for vllm / python: record argv and environment, then run until SIGTERM.
rec="${SHIM_OUT}/$$"
env -0 > "${rec}.env"
printf '%s\0' "${0##*/}" "$@" > "${rec}.tmp"
mv "${rec}.tmp" "${rec}.argv"
prev=""
for a in "$@"; do
  if [ "${prev}" = "--port" ] && [ "${a}" = "${SHIM_FAIL_PORT:-none}" ]; then exit 7; fi
  prev="${a}"
done
trap 'kill "${sp}" 2>/dev/null; exit 0' TERM
sleep 120 &
sp=$!
wait "${sp}"
"""
TEST_ONLY_ENV = {"PATH", "PWD", "OLDPWD", "SHLVL", "_", "SHIM_OUT", "SHIM_FAIL_PORT"}
LWS_ENV = {"LWS_LEADER_ADDRESS", "LWS_GROUP_SIZE", "LWS_WORKER_INDEX"}


@pytest.fixture(scope="module")
def shim_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("shims")
    for name in ("vllm", "python"):
        (d / name).write_text(SHIM)
        (d / name).chmod(0o755)
    return d


def pod_ip(role_index: int, g: int, w: int) -> str:
    return f"10.{role_index + 1}.{g}.{w + 10}"


def secret(name: str, key: str) -> str:
    return f"<secret {name}/{key}>"


def container_env(c: dict, ip: str) -> dict[str, str]:
    """The container's env as the kubelet resolves it (downward API pod IP, Secret values)."""
    env = {}
    for e in c.get("env", []):
        if "value" in e:
            env[e["name"]] = kubelet_expand(e["value"], env)  # the kubelet expands $(VAR) of earlier entries
        elif "fieldRef" in e["valueFrom"]:
            assert e["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
            env[e["name"]] = ip
        else:
            ref = e["valueFrom"]["secretKeyRef"]
            env[e["name"]] = secret(ref["name"], ref["key"])
    return env


class Pod:
    """One pod's container started as the kubelet would (a stand-in: no kubelet here)."""

    def __init__(self, doc: dict, g: int, w: int, ip: str, shims: Path, out: Path, shm: Path, **extra_env: str):
        lwt = doc["spec"]["leaderWorkerTemplate"]
        tpl = lwt["leaderTemplate"] if w == 0 and "leaderTemplate" in lwt else lwt["workerTemplate"]
        (self.container,) = tpl["spec"]["containers"]
        name = doc["metadata"]["name"]
        env = container_env(self.container, ip)
        # injected by the LWS pod webhook (pkg/utils/pod/pod_utils.go)
        env.update(
            {
                "LWS_LEADER_ADDRESS": f"{name}-{g}.{name}.{NAMESPACE}",
                "LWS_GROUP_SIZE": str(lwt["size"]),
                "LWS_WORKER_INDEX": str(w),
            }
        )
        self.leader = env["LWS_LEADER_ADDRESS"]
        argv = [kubelet_expand(a, env) for a in self.container["command"] + self.container["args"]]
        # widep escapes '$(' and '$$' as '$$(' and '$$$$': the kubelet only undoes that escaping, never substitutes
        assert argv == [kubelet_expand(a, {}) for a in self.container["command"] + self.container["args"]], (
            "kubelet would substitute a variable into the script"
        )
        env["WIDEP_SHM_DIR"] = str(shm)  # sandbox: the script clears this folder (/dev/shm in a pod)
        env.update({"PATH": f"{shims}:/usr/bin:/bin", "SHIM_OUT": str(out)}, **extra_env)
        self.out = out
        self.proc = subprocess.Popen(
            argv, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def records(self, count: int, timeout: float = 30) -> list[tuple[list[str], dict[str, str]]]:
        deadline = time.monotonic() + timeout
        while len(list(self.out.glob("*.argv"))) < count:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(
                    f"{len(list(self.out.glob('*.argv')))} of {count} processes started; "
                    f"exit {self.proc.returncode}; stderr: {self.proc.stderr.read()}"
                )
            time.sleep(0.02)
        time.sleep(0.1)  # nothing else may start
        found = sorted(self.out.glob("*.argv"))
        assert len(found) == count, [f.name for f in found]
        out = []
        for f in found:
            argv = f.read_bytes().decode().split("\0")[:-1]
            env_items = (self.out / f.name.replace(".argv", ".env")).read_bytes().decode().split("\0")[:-1]
            env = dict(item.split("=", 1) for item in env_items)
            out.append((argv, {k: val for k, val in env.items() if k not in TEST_ONLY_ENV}))
        return out

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        finally:
            # returns as soon as the group is gone; the 20 s are for a heavily loaded machine
            survivors = _group_alive(self.proc.pid, timeout=20)
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        assert not survivors, "processes of the pod outlived it"
        return code


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc. Zombies are left out: orphans
    are reaped by whatever PID 1 this machine has, sometimes seconds later."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def _group_alive(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _group_members(pgid):
            return False
        time.sleep(0.05)
    return True


def expected_commands(p, rp, g: int, w: int, placement: str, ip: str, leader: str, model_path: str | None):
    """What `widep render` gives for the ranks of pod (g, w), with the documented pod substitutions."""
    per_rank = placement == "pod-per-rank" and rp.dp_local > 1
    if per_rank:
        rank = next(r for r in rp.ranks if r.replica == g and r.dp_rank == w)
        node, wanted = rank.node, {w}
    else:
        node = rp.group_nodes[g][w]
        wanted = {r.dp_rank for r in rp.ranks if r.replica == g and r.node == node}
    ctx = RenderContext(model_path=model_path, leader_addresses={(rp.name, g): leader}, node_addresses={node: ip})
    cmds = [c for c in render_role(p, rp, ctx) if c.replica == g and set(c.dp_ranks) <= wanted and c.node == node]
    out = []
    for c in cmds:
        argv = list(c.argv)
        env = {k: (secret(val.secret, val.key) if isinstance(val, EnvRef) else val) for k, val in c.env}
        gpus = [gid for r in rp.ranks if r.replica == g and r.dp_rank in c.dp_ranks for gid in r.gpus]
        offset = min(gpus) if per_rank else rp.spec.first_gpu
        if per_rank:  # every pod serves the role's port
            argv[argv.index("--port") + 1] = str(rp.http_port)
        if "CUDA_VISIBLE_DEVICES" in env:  # a pod numbers its GPUs from 0
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(int(x) - offset) for x in env["CUDA_VISIBLE_DEVICES"].split(","))
        if "VLLM_CPU_OMP_THREADS_BIND" in env:  # and its CPU slots from 0 (its own cores: cluster.cpu_cores, which
            # wraps bare-metal slots onto a shared core budget, does not apply to a pod)
            env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(str(gid - offset) for gid in gpus)
        if "VLLM_ENGINE_READY_TIMEOUT_S" in env:  # the engine may take the pod's whole start budget
            env["VLLM_ENGINE_READY_TIMEOUT_S"] = str(start_budget_s(p, rp))
        out.append((argv, env))
    return out


@pytest.mark.parametrize(("name", "source", "placement"), CASES, ids=CASE_IDS)
def test_every_worker_runs_what_widep_render_gives(tmp_path, shim_dir, name, source, placement):
    """For every role, replica and worker index: the pod's processes (argv and environment) are
    exactly those `widep render` gives for the same ranks, the address being the leader's."""
    p = plan_of(source)
    docs = lws_docs(L.render_lws(p, namespace=NAMESPACE, placement=placement))
    model_path = L.pod_model_path(p, L.LWSOptions())
    for ri, (doc, rp) in enumerate(zip(docs, p.roles, strict=False)):
        size = doc["spec"]["leaderWorkerTemplate"]["size"]
        per_rank = placement == "pod-per-rank" and rp.dp_local > 1
        assert size == (rp.dp_size if per_rank else rp.nodes_per_group)
        assert doc["spec"]["replicas"] == rp.spec.replicas
        started = 0
        for g in range(rp.spec.replicas):
            for w in range(size):
                out, shm = tmp_path / f"{ri}-{g}-{w}", tmp_path / f"shm-{ri}-{g}-{w}"
                out.mkdir()
                shm.mkdir()
                (shm / "nccl-leftover").write_text("x")
                ip = pod_ip(ri, g, w)
                pod = Pod(doc, g, w, ip, shim_dir, out, shm)
                want = expected_commands(p, rp, g, w, placement, ip, pod.leader, model_path)
                try:
                    got = pod.records(len(want))
                finally:
                    pod.stop()
                assert sorted(a for a, _ in got) == sorted(a for a, _ in want), f"{rp.name} replica {g} worker {w}"
                for argv, env in want:
                    (actual,) = [e for a, e in got if a == argv]
                    extras = {k: val for k, val in actual.items() if k not in env}
                    assert {k: actual.get(k) for k in env} == env, f"{rp.name} replica {g} worker {w}: {argv[:3]}"
                    assert set(extras) <= LWS_ENV | set(L.K8S_ONLY_ENV), sorted(extras)
                    assert extras.get("POD_IP") == ip
                assert not any(shm.iterdir()), "/dev/shm leftovers were not cleared"
                started += len(got)
        assert started == len(render_role(p, rp, RenderContext(model_path=model_path)))


def qwen_pod(shim_dir: Path, tmp_path: Path, **extra_env: str) -> tuple[Pod, dict]:
    p = plan_of(REPO / "topologies" / "qwen3-30b-a3b-1x2-h100.yaml")
    (doc,) = lws_docs(L.render_lws(p, namespace=NAMESPACE))
    for d in ("out", "shm"):
        (tmp_path / d).mkdir()
    return Pod(doc, 0, 0, "10.9.9.9", shim_dir, tmp_path / "out", tmp_path / "shm", **extra_env), doc


def test_a_dying_rank_fails_the_pod_and_stops_its_siblings(tmp_path, shim_dir):
    pod, _ = qwen_pod(shim_dir, tmp_path, SHIM_FAIL_PORT="8001")
    try:
        code = pod.proc.wait(30)
    finally:
        pod.stop()
    assert code == 7
    assert "exited with status 7; stopping the others" in pod.proc.stderr.read()


def test_sigterm_stops_every_rank(tmp_path, shim_dir):
    pod, _ = qwen_pod(shim_dir, tmp_path)
    assert len(pod.records(2)) == 2
    assert pod.stop() == 128 + signal.SIGTERM  # exit status of the interrupted wait, not 0


def test_wrong_group_size_refuses_to_start(tmp_path, shim_dir):
    p = plan_of(REPO / "topologies" / "deepseek-r1-decode-2x8-h200.yaml")
    (doc,) = lws_docs(L.render_lws(p))
    doc["spec"]["leaderWorkerTemplate"]["size"] = 3  # hand-edited size: the ranks would be wrong
    for d in ("out", "shm"):
        (tmp_path / d).mkdir()
    pod = Pod(doc, 0, 1, "10.0.0.1", shim_dir, tmp_path / "out", tmp_path / "shm")
    assert pod.proc.wait(10) == 1
    assert "computed for 2" in pod.proc.stderr.read()
    assert not list((tmp_path / "out").iterdir())


# --------------------------------------------------------------------------------------------
# the probe script, against real HTTP servers


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.server.status if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):  # quiet
        pass


def _server(status: int) -> tuple[http.server.HTTPServer, int]:
    srv = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    srv.status = status
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, srv.server_address[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_health_check_script_needs_every_rank_healthy():
    ok1, p1 = _server(200)
    ok2, p2 = _server(200)
    bad, p3 = _server(503)
    try:

        def run(ports):
            return subprocess.run(["/bin/bash", "-c", L.health_check_script("127.0.0.1", ports)], timeout=20).returncode

        assert run([p1, p2]) == 0
        assert run([p1, p3]) == 1  # one rank answers 503
        assert run([p1, _free_port()]) == 1  # one rank does not listen
    finally:
        for s in (ok1, ok2, bad):
            s.shutdown()


# --------------------------------------------------------------------------------------------
# option errors are for people


@pytest.mark.parametrize(
    ("topology", "options", "message"),
    [
        (
            "deepseek-r1-decode-2x8-h200.yaml",
            {"placement": "pod-per-rank"},
            "CUDA IPC, which cannot cross pod boundaries",
        ),
        ("deepseek-r1-decode-2x8-h200.yaml", {"placement": "per-gpu"}, "Valid: pod-per-node, pod-per-rank"),
        (
            "deepseek-r1-decode-2x8-h200.yaml",
            {"exclusive_topology": "kubernetes.io/hostname"},
            "2 pods x 8 GPUs > 8 per node",
        ),
        ("deepseek-r1-decode-2x8-h200.yaml", {"gpu_resource": "gpu"}, "Given: 'gpu'"),
        ("deepseek-r1-decode-2x8-h200.yaml", {"memory": "512GB"}, "not a Kubernetes quantity. Given: '512GB'"),
        (
            "deepseek-r1-decode-2x8-h200.yaml",
            {"model_cache": "nfs:/x"},
            "Valid: hostpath:/ABSOLUTE/PATH, pvc:CLAIM-NAME, hostpath-ro",
        ),
        ("deepseek-r1-decode-2x8-h200.yaml", {"jit_cache": "pvc-ro:x"}, "--jit-cache: cannot read this volume"),
        ("deepseek-r1-decode-2x8-h200.yaml", {"provider": "aws"}, "--provider: unknown provider profile"),
        ("deepseek-r1-decode-2x8-h200.yaml", {"front_door": "llm-d"}, "needs a prefill and a decode role"),
        ("deepseek-r1-decode-2x8-h200.yaml", {"ephemeral_storage": "1TB"}, "--ephemeral-storage"),
        ("deepseek-r1-pd-3x8-h200.yaml", {"front_door": "gateway"}, "Valid: auto, router, llm-d, none"),
        ("deepseek-r1-decode-2x8-h200.yaml", {"namespace": "LLM"}, "--namespace"),
        ("deepseek-r1-decode-2x8-h200.yaml", {"gpu_products": ("NVIDIA H200",)}, "--gpu-product"),
    ],
)
def test_option_errors(topology, options, message):
    p = plan_of(REPO / "topologies" / topology)
    with pytest.raises(UserError, match="Given") as err:
        L.render_lws(p, **options)
    assert message in str(err.value)


def test_pod_per_rank_needs_external_mode():
    p = plan_of(
        VARIANTS["decode-2x8-hybrid"]
        | {
            "roles": [
                VARIANTS["decode-2x8-hybrid"]["roles"][0]
                | {"all2all_backend": "allgather_reducescatter", "dbo": {"enabled": False}}
            ]
        }
    )
    with pytest.raises(UserError, match="needs serving.dp_mode external"):
        L.render_lws(p, placement="pod-per-rank")


def test_fixed_host_is_refused():
    p = plan_of(variant("tiny-moe-cpu.yaml", **{"serving.host": "127.0.0.1"}))
    with pytest.raises(UserError, match="serving.host: '127.0.0.1' is a fixed address"):
        L.render_lws(p)


def test_too_many_ports_for_an_inference_pool():
    p = plan_of(
        variant(
            "qwen3-30b-a3b-1x2-h100.yaml",
            **{"model.preset": "qwen3-30b-a3b", "cluster.gpus_per_node": 16, "cluster.gpu": "B200"},
        )
    )
    L.render_lws(p)  # fine without a pool
    with pytest.raises(UserError, match="at most 8 targetPorts"):
        L.render_lws(p, inference_pool=True)


# --------------------------------------------------------------------------------------------
# golden files in lws/, regenerated only by `python -m widep.k8s.regen`


def test_golden_files_are_up_to_date(crd):
    expected = regen.expected_files(REPO / "topologies", crd)
    assert regen.stale(REPO / "lws", expected) == [], "run: python -m widep.k8s.regen"
    pd = [t for t in TOPOLOGIES if {rp.kind for rp in plan_of(t).roles} >= {"prefill", "decode"}]
    assert pd, "a curated P/D topology"
    llmd_variants = [t for t in pd if f"{t.stem}.llm-d.yaml" in expected]
    assert REPO / "topologies" / "deepseek-r1-pd-3x8-h200.yaml" in llmd_variants
    trees = {name.split("/")[1] for name in expected if name.startswith(regen.KUSTOMIZE_DIR + "/")}
    assert trees == {t.stem for t in pd}  # a kustomize tree per P/D topology (built by kustomize in test_k8s_clusters)
    assert len([n for n in expected if not n.startswith(regen.KUSTOMIZE_DIR + "/")]) == len(TOPOLOGIES) + sum(
        len(L.sensible_placements(plan_of(t))) - 1 for t in TOPOLOGIES
    ) + 2 * len(llmd_variants)
    for t in pd:  # every P/D manifest routes prefill then decode: a vllm-router in P/D mode, or llm-d's stack
        default = list(yaml.safe_load_all(expected[f"{t.stem}.yaml"]))
        router = next(d for d in default if d["kind"] == "Deployment")
        assert "--vllm-pd-disaggregation" in router["spec"]["template"]["spec"]["containers"][0]["args"]
        if t not in llmd_variants:  # only where llm-d's routing sidecar cannot front decode (ports), and says why
            with pytest.raises(UserError, match="routing sidecar cannot front decode"):
                L.render_lws(plan_of(t), front_door="llm-d")
            continue
        llmd = list(yaml.safe_load_all(expected[f"{t.stem}.llm-d.yaml"]))
        assert "InferencePool" not in {d["kind"] for d in llmd}  # the router chart's release makes it
        values = yaml.safe_load(expected[f"{regen.VALUES_DIR}/{t.stem}.llm-d.yaml"])["router"]
        assert values["epp"] and values["inferencePool"]["create"] is True and values["modelServers"]["matchLabels"]
    for name, text in expected.items():
        if name.startswith((regen.VALUES_DIR + "/", regen.KUSTOMIZE_DIR + "/")):
            continue
        first, second = text.splitlines()[:2]
        assert first.startswith("# Generated by `widep lws topologies/") and first.endswith("- do not edit.")
        assert second == "# Regenerate every file in lws/ with: python -m widep.k8s.regen"
        assert (name.endswith(".pod-per-rank.yaml")) == ("--placement pod-per-rank" in first)


def test_regen_check_reports_stale_missing_and_extra(tmp_path, crd):
    topo = tmp_path / "topologies"
    topo.mkdir()
    for name in ("tiny-moe-cpu.yaml", "qwen3-30b-a3b-1x2-h100.yaml"):
        (topo / name).write_text((REPO / "topologies" / name).read_text())
    out = tmp_path / "lws"
    code = subprocess.run(
        [sys.executable, "-m", "widep.k8s.regen", "--topologies", str(topo), "--out", str(out), "--crd", str(crd)],
        capture_output=True,
        text=True,
    )
    assert code.returncode == 0, code.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "qwen3-30b-a3b-1x2-h100.pod-per-rank.yaml",
        "qwen3-30b-a3b-1x2-h100.yaml",
        "tiny-moe-cpu.yaml",
    ]
    (out / "tiny-moe-cpu.yaml").write_text((out / "tiny-moe-cpu.yaml").read_text().replace("8000", "8001"))
    (out / "qwen3-30b-a3b-1x2-h100.yaml").unlink()
    (out / "old.yaml").write_text("{}\n")
    check = subprocess.run(
        [
            sys.executable,
            "-m",
            "widep.k8s.regen",
            "--topologies",
            str(topo),
            "--out",
            str(out),
            "--crd",
            str(crd),
            "--check",
        ],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 1
    assert check.stdout.splitlines() == [
        f"{out}/qwen3-30b-a3b-1x2-h100.yaml: missing",
        f"{out}/tiny-moe-cpu.yaml: differs from what widep generates now",
        f"{out}/old.yaml: not generated from any topology (remove it)",
    ]


# --------------------------------------------------------------------------------------------
# the CLI


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["lws", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_prints_validated_yaml(capsys, crd):
    topo = str(REPO / "topologies" / "deepseek-r1-pd-3x8-h200.yaml")
    code, out, err = run_cli(capsys, topo, "--namespace", NAMESPACE, "--image", "ghcr.io/x/vllm:1", "--crd", str(crd))
    assert code == 0, err
    assert out.startswith(f"# Generated by `widep lws {topo} --namespace llm --image ghcr.io/x/vllm:1` - do not edit.")
    docs = list(yaml.safe_load_all(out))
    assert [d["kind"] for d in docs] == [
        "LeaderWorkerSet",
        "Service",
        "LeaderWorkerSet",
        "Service",
        "Deployment",
        "Service",
    ]
    assert all(d["metadata"]["namespace"] == NAMESPACE for d in docs)
    assert err == ""


def test_cli_output_file_and_options(capsys, crd, tmp_path):
    topo = str(REPO / "topologies" / "qwen3-30b-a3b-1x2-h100.yaml")
    target = tmp_path / "out.yaml"
    code, out, err = run_cli(
        capsys,
        topo,
        "--placement",
        "pod-per-rank",
        "--inference-pool",
        "--rdma-resource",
        "",
        "--gpu-product",
        "NVIDIA-H100-80GB-HBM3",
        "--gpu-product",
        "NVIDIA-H100-NVL",
        "--model-cache",
        "pvc:models",
        "-o",
        str(target),
        "--crd",
        str(crd),
    )
    assert code == 0, err
    assert out == ""
    assert "wrote " + str(target) + ": 3 objects, validated" in err
    assert "not checked" not in err  # the InferencePool is checked against the shipped GAIE CRD
    docs = list(yaml.safe_load_all(target.read_text()))
    lwt = docs[0]["spec"]["leaderWorkerTemplate"]
    assert lwt["size"] == 2
    (c,) = lwt["workerTemplate"]["spec"]["containers"]
    assert c["resources"]["limits"] == {
        "cpu": "4",
        "memory": "48Gi",
        "ephemeral-storage": "16Gi",
        "nvidia.com/gpu": "1",
    }
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"], "add": ["IPC_LOCK"]},
    }
    assert lwt["workerTemplate"]["spec"]["volumes"][1] == {
        "name": "model-cache",
        "persistentVolumeClaim": {"claimName": "models"},
    }
    first = target.read_text().splitlines()[0]
    assert (
        "--rdma-resource ''" in first
        and "--model-cache pvc:models" in first
        and "--gpu-product NVIDIA-H100-NVL" in first
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["TOPO", "--placement", "pod-per-rank"], "cannot cross pod boundaries"),
        (["TOPO", "--validate", "x.yaml"], "not both"),
        (["/nonexistent/topology.yaml"], "not found"),
        (["TOPO", "--shm-size", "lots"], "--shm-size: not a Kubernetes quantity"),
    ],
)
def test_cli_errors_exit_2(capsys, args, message):
    topo = str(REPO / "topologies" / "deepseek-r1-decode-2x8-h200.yaml")
    code, out, err = run_cli(capsys, *[topo if a == "TOPO" else a for a in args])
    assert code == 2 and out == ""
    assert message in err


def test_cli_refuses_to_print_manifests_that_do_not_validate(capsys, crd, monkeypatch, tmp_path):
    """The guard itself is under test, so the generator is made to emit a broken LWS (size 0,
    which the LWS webhook rejects) by wrapping the real one."""
    real = L.render_lws

    def broken(*args, **kwargs):
        docs = real(*args, **kwargs)
        docs[0]["spec"]["leaderWorkerTemplate"]["size"] = 0
        return docs

    monkeypatch.setattr(L, "render_lws", broken)
    target = tmp_path / "out.yaml"
    code, out, err = run_cli(
        capsys, str(REPO / "topologies" / "tiny-moe-cpu.yaml"), "-o", str(target), "--crd", str(crd)
    )
    assert code == 1 and out == "" and not target.exists()
    assert "validator rejects" in err and "spec.leaderWorkerTemplate.size" in err


def test_generated_files_pass_widep_lws_validate(capsys, crd):
    code, out, err = run_cli(capsys, "--validate", str(REPO / "lws"), "--crd", str(crd))
    assert code == 0, out
    assert out.startswith("ok: ")


@pytest.mark.parametrize(
    ("topology", "placement", "limit"),
    [
        ("deepseek-r1-decode-4x8-h200-eplb.yaml", "pod-per-node", 50),  # 4 pods: "<name>-0-3" <= 63, "<name>-0" <= 52
        ("qwen3-30b-a3b-1x2-h100.yaml", "pod-per-rank", 50),
        ("tiny-moe-cpu.yaml", "pod-per-node", 52),  # size 1: the StatefulSet is "<name>"
    ],
)
def test_name_length_limit_matches_the_validator(crd, topology, placement, limit):
    role = yaml.safe_load((REPO / "topologies" / topology).read_text())["roles"][0]["name"]
    ok = variant(topology, name="n" * (limit - len(role) - 1))
    docs = L.render_lws(plan_of(ok), placement=placement)
    _, problems = v.validate_text(L.dump_manifests(docs, L.prerequisite_lines(docs)), crd)
    assert [pr.format() for pr in problems if pr.failing] == []
    too_long = variant(topology, name="n" * (limit - len(role)))
    with pytest.raises(UserError, match=f"at most {limit} characters"):
        L.render_lws(plan_of(too_long), placement=placement)


def test_router_deployment_and_service_validate_and_reach_every_rank():
    """With a router, `widep lws` adds a vllm-router Deployment + Service whose worker URLs are the LWS pods' DNS
    names on the ranks' ports, and the whole file validates."""
    from widep.k8s.lws import render_lws
    from widep.k8s.validate import default_crd_path, validate_documents
    from widep.plan import plan as make_plan
    from widep.spec.topology import load_topology as load

    p = make_plan(load(Path(__file__).parents[1] / "topologies" / "tiny-moe-cpu-2x.yaml"))
    docs = render_lws(p, namespace="llm", router_image="example.com/vllm-router:1")
    dep = next(d for d in docs if d["kind"] == "Deployment")
    svc = [d for d in docs if d["kind"] == "Service" and d["metadata"]["name"].endswith("-router")]
    assert svc and dep["spec"]["template"]["spec"]["containers"][0]["image"] == "example.com/vllm-router:1"
    args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
    i = args.index("--worker-urls")
    assert args[i + 1 : i + 3] == [
        "http://tiny-moe-cpu-2x-serve-0.tiny-moe-cpu-2x-serve.llm.svc:8300",
        "http://tiny-moe-cpu-2x-serve-1.tiny-moe-cpu-2x-serve.llm.svc:8300",
    ]
    problems = [pr for pr in validate_documents(docs, default_crd_path()) if pr.severity != "note"]
    assert problems == []
