"""`widep lws` output for real clusters: front doors, provider profiles, sizing/QoS, start budgets, caches,
hardening and kustomize (widep.k8s.frontdoor, providers, resources, kustomize).

Real components: the planner, the LWS v0.10.0 and InferencePool v1.5.0 CRDs shipped in widep and the validator
built on them, vllm-router's own argument parser (the PyPI package the router image must contain), and a real
kustomize (``kubectl kustomize``: .ci/run installs Debian's kubernetes-client where no kubectl is present). No API
server, kubelet, scheduler or router chart can run on this machine kind; what those would do with the manifests
(schedule with the affinity, compute QoS, admit under Pod Security) is re-implemented after the Kubernetes rules
and said so where it is used.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from widep.cli import main
from widep.errors import UserError
from widep.k8s import frontdoor
from widep.k8s import lws as L
from widep.k8s import validate as v
from widep.k8s.kustomize import json_patch
from widep.k8s.resources import pod_security_level, qos_class, start_budget_s
from widep.plan import plan as make_plan
from widep.spec.topology import load_topology, parse_topology

REPO = Path(__file__).resolve().parents[1]
PD = REPO / "topologies" / "deepseek-r1-pd-3x8-h200.yaml"


def plan_of(path: Path, **changes):
    doc = yaml.safe_load(path.read_text())
    for dotted, value in changes.items():
        node = doc
        *parents, last = dotted.split(".")
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
        node[last] = value
    return make_plan(parse_topology(doc, "(test)"))


def pod(doc: dict) -> dict:
    return doc["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]


def by_name(docs: list[dict]) -> dict[tuple[str, str], dict]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def valid(docs: list[dict]) -> list[str]:
    _, problems = v.validate_text(L.dump_manifests(docs, L.prerequisite_lines(docs)))
    return [p.format() for p in problems]


def valid_with_chart_pool(docs: list[dict], pool: dict) -> list[str]:
    """Problems of llm-d's manifests plus the pool the router chart creates for them, checked as `widep lws` checks
    it (the chart's objects exist; the pool is not flagged as owned twice: it is not in the file)."""
    from widep.k8s.validate.cross import prerequisites_of

    head = "".join(f"# {line}\n" for line in L.prerequisite_lines(docs))
    known = prerequisites_of(head) | set(frontdoor.chart_objects(pool["metadata"]["name"]))
    return [p.format() for p in v.validate_documents(docs + [pool], v.default_crd_path(), prerequisites=known)]


# --------------------------------------------------------------------------------------------
# P/D front doors


def test_pd_router_front_door_parses_with_vllm_routers_own_parser():
    """The default P/D front door: vllm-router's own parser (``vllm_router.launch_router``) reads the
    Deployment's args as P/D mode, every prefill rank as --prefill and every decode rank as --decode, in
    LWS pod DNS form, and waits for workers as long as the slowest role's start budget."""
    from vllm_router.launch_router import parse_router_args

    p = make_plan(load_topology(PD))
    docs = L.render_lws(p, namespace="llm")
    assert valid(docs) == []
    dep = by_name(docs)[("Deployment", f"{p.name}-router")]
    (c,) = dep["spec"]["template"]["spec"]["containers"]
    assert c["command"] == ["vllm-router"] and c["image"] == frontdoor.ROUTER_IMAGE
    args = parse_router_args(c["args"])
    args._validate_router_args()
    assert args.vllm_pd_disaggregation
    pre = f"{p.name}-prefill-0.{p.name}-prefill.llm.svc"
    dec0, dec1 = (f"{p.name}-decode-0{w}.{p.name}-decode.llm.svc" for w in ("", "-1"))
    assert [u for u, _ in args.prefill_urls] == [f"http://{pre}:{8000 + i}" for i in range(8)]
    assert [u for u in args.decode_urls] == [f"http://{dec0}:{8200 + i}" for i in range(8)] + [
        f"http://{dec1}:{8200 + i}" for i in range(8)
    ]
    assert args.worker_startup_timeout_secs == max(start_budget_s(p, rp) for rp in p.roles)
    assert qos_class(dep["spec"]["template"]["spec"]) == "Guaranteed"
    assert pod_security_level(dep["spec"]["template"]["spec"]) == ("restricted", [])
    # vLLM behind a pooling proxy keeps connections open longer than the proxy's idle timeout
    for d in docs:
        if d["kind"] == "LeaderWorkerSet":
            env = {e["name"]: e.get("value") for e in pod(d)["containers"][0]["env"]}
            assert env["VLLM_HTTP_TIMEOUT_KEEP_ALIVE"] == "120"


def test_llmd_front_door_one_pool_sidecar_and_epp_values():
    p = make_plan(load_topology(PD))
    docs = L.render_lws(p, front_door="llm-d")
    assert valid(docs) == []
    # the router chart owns the one pool (issue 28 defect 1): the manifests have none, the values make it
    assert not {"InferencePool", "Deployment"} & {d["kind"] for d in docs}
    values = L.router_values_for(p, docs)
    pool = frontdoor.chart_pool(frontdoor.chart_release(p), values)
    assert valid_with_chart_pool(docs, pool) == []
    match = pool["spec"]["selector"]["matchLabels"]
    roles = {}
    for d in docs:
        if d["kind"] == "LeaderWorkerSet":
            labels = d["spec"]["leaderWorkerTemplate"]["workerTemplate"]["metadata"]["labels"]
            assert all(labels.get(k) == val for k, val in match.items())  # the pool selects both roles' pods
            roles[labels["llm-d.ai/role"]] = d  # ... which its label tells apart
    assert set(roles) == {"prefill", "decode"}
    ports = [t["number"] for t in pool["spec"]["targetPorts"]]
    assert ports == list(range(8000, 8008))
    # prefill serves the pool ports itself; decode has the routing sidecar there, in front of vLLM's 8200..8207
    assert [cp["containerPort"] for cp in pod(roles["prefill"])["containers"][0]["ports"]] == ports
    assert "initContainers" not in pod(roles["prefill"])
    (side,) = pod(roles["decode"])["initContainers"]
    assert side["restartPolicy"] == "Always"  # a native sidecar
    assert [cp["containerPort"] for cp in side["ports"]] == ports
    assert {"--port=8000", "--vllm-port=8200", "--data-parallel-size=8", "--kv-connector=nixlv2"} <= set(side["args"])
    assert [cp["containerPort"] for cp in pod(roles["decode"])["containers"][0]["ports"]] == list(range(8200, 8208))
    assert qos_class(pod(roles["decode"])) == "Guaranteed"  # the sidecar's requests equal its limits too
    assert frontdoor.check_router_values(values, pool) == []
    assert values["router"]["modelServers"]["matchLabels"] == match
    epp = yaml.safe_load(next(iter(values["router"]["epp"]["pluginsCustomConfig"].values())))
    assert [prof["name"] for prof in epp["schedulingProfiles"]] == ["prefill", "decode"]
    assert {"disagg-profile-handler", "prefill-filter", "decode-filter", "prefix-cache-scorer", "queue-scorer"} <= {
        pl["type"] for pl in epp["plugins"]
    }
    broken = yaml.safe_load(yaml.safe_dump(values))
    broken["router"]["modelServers"]["targetPorts"].append({"number": 8000})
    assert any("unique" in m for m in frontdoor.check_router_values(broken, pool))


def test_inference_pool_is_checked_against_the_gaie_crd():
    p = make_plan(load_topology(PD))
    docs = L.render_lws(p, front_door="llm-d")
    pool = frontdoor.chart_pool(p.name, L.router_values_for(p, docs))  # what the router chart creates
    pool["spec"]["targetPorts"][1]["number"] = 8000
    assert any("port number must be unique" in m for m in valid_with_chart_pool(docs, pool))
    pool["spec"]["targetPorts"] = [{"number": 8000 + i} for i in range(9)]
    assert any("spec.targetPorts:" in m and "is too long" in m for m in valid_with_chart_pool(docs, pool))  # maxItems 8
    pool["spec"]["targetPorts"] = []
    assert any("spec.targetPorts: [] should be non-empty" in m for m in valid_with_chart_pool(docs, pool))  # minItems 1
    pool["spec"]["targetPorts"] = [{"number": 8000}]
    del pool["spec"]["endpointPickerRef"]["port"]
    assert any("port is required when kind is 'Service'" in m for m in valid_with_chart_pool(docs, pool))


def test_llmd_refuses_ports_the_sidecar_cannot_front():
    same_port = plan_of(PD, **{"roles.1.port": 8000})
    with pytest.raises(UserError, match="routing sidecar cannot front decode") as err:
        L.render_lws(same_port, front_door="llm-d")
    assert "Valid:" in str(err.value)


def test_no_front_door_is_said_in_the_header(capsys):
    code = main(["lws", str(PD), "--front-door", "none"])
    out = capsys.readouterr().out
    assert code == 0 and "warning: no front door" in out
    assert "kind: Deployment" not in out and "kind: InferencePool" not in out


def test_cli_writes_router_values_beside_the_manifests(capsys, tmp_path):
    target = tmp_path / "pd.yaml"
    code = main(["lws", str(PD), "--front-door", "llm-d", "-o", str(target)])
    err = capsys.readouterr().err
    assert code == 0, err
    values = tmp_path / "pd.router-values.yaml"
    assert "llm-d router chart values" in err and values.is_file()
    code = main(["lws", "--validate", str(target), "--validate", str(values)])
    assert code == 0, capsys.readouterr().out


def test_validate_warns_on_router_image_without_tag_or_entry_point(capsys, tmp_path):
    p = make_plan(load_topology(PD))
    with pytest.raises(UserError, match="--router-image: no tag") as err:  # widep's own output: refused up front
        L.render_lws(p, router_image="registry.example/vllm-router")
    assert err.value.exit_code == 2
    docs = L.render_lws(p)
    dep = next(d for d in docs if d["kind"] == "Deployment")
    dep["spec"]["template"]["spec"]["containers"][0]["image"] = "registry.example/vllm-router"  # a user's file
    _, problems = v.validate_text(L.dump_manifests([dep]))
    assert [(pr.severity, pr.layer) for pr in problems] == [("warning", "front-door")]
    assert "has no tag" in problems[0].message
    dep["spec"]["template"]["spec"]["containers"][0]["image"] = "registry.example/vllm-router:0.1.17"
    dep["spec"]["template"]["spec"]["containers"][0]["command"] = ["/opt/router/bin/run"]
    dep["spec"]["template"]["spec"]["containers"][0]["args"].insert(0, "vllm-router")
    _, problems = v.validate_text(L.dump_manifests([dep]))
    assert [pr.message for pr in problems if "not a known vllm-router entry point" in pr.message]
    dep["spec"]["template"]["spec"]["containers"][0]["command"] = ["python3", "-m", "vllm_router.launch_router"]
    dep["spec"]["template"]["spec"]["containers"][0]["args"].pop(0)
    _, problems = v.validate_text(L.dump_manifests([dep]))
    assert problems == []


# --------------------------------------------------------------------------------------------
# provider profiles, resources, budgets, caches, hardening


def test_generic_profile_requests_no_rdma_and_prefers_the_gpu_label():
    p = make_plan(load_topology(PD))
    for d in L.render_lws(p, rdma_resource="none"):
        if d["kind"] != "LeaderWorkerSet":
            continue
        spec = pod(d)
        limits = spec["containers"][0]["resources"]["limits"]
        assert not any(k.startswith("rdma/") for k in limits)
        aff = spec["affinity"]["nodeAffinity"]
        assert "requiredDuringSchedulingIgnoredDuringExecution" not in aff
        (pref,) = aff["preferredDuringSchedulingIgnoredDuringExecution"]
        assert pref["preference"]["matchExpressions"][0]["key"] == "nvidia.com/gpu.product"
    named = plan_of(PD, **{"cluster.network.rdma_resource": "rdma/roce_gdr"})
    lws = next(d for d in L.render_lws(named) if d["kind"] == "LeaderWorkerSet")
    assert pod(lws)["containers"][0]["resources"]["requests"]["rdma/roce_gdr"] == "1"
    assert L.render_lws(named, rdma_resource="") != L.render_lws(named)  # '' turns it off
    assert L.render_lws(named, rdma_resource="") == L.render_lws(named, rdma_resource="none")


def test_coreweave_and_gke_profiles():
    p = make_plan(load_topology(PD))
    cw = {d["metadata"]["name"]: d for d in L.render_lws(p, provider="coreweave") if d["kind"] == "LeaderWorkerSet"}
    gke = {d["metadata"]["name"]: d for d in L.render_lws(p, provider="gke") if d["kind"] == "LeaderWorkerSet"}
    for name, d in cw.items():
        c = pod(d)["containers"][0]
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["NCCL_IB_HCA"] == env["NVSHMEM_HCA_PREFIX"] == "ibp"
        assert c["resources"]["limits"]["rdma/ib"] == "1"
        assert pod_security_level(pod(d))[0] == "privileged"  # IPC_LOCK/SYS_RAWIO and hostPath caches
        g = gke[name]
        gc = pod(g)["containers"][0]
        assert gc["securityContext"] == {"privileged": True}  # DeepEP's GPU-initiated RDMA on GKE
        genv = {e["name"]: e.get("value") for e in gc["env"]}
        assert genv["NVSHMEM_DISABLED_GDRCOPY"] == "true" and "NVIDIA_GDRCOPY" not in genv
        ann = g["spec"]["leaderWorkerTemplate"]["workerTemplate"]["metadata"]["annotations"]
        assert "rdma-0" in ann["networking.gke.io/interfaces"]
        terms = pod(g)["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert terms["nodeSelectorTerms"][0]["matchExpressions"][0]["values"] == ["nvidia-h200-141gb"]
        assert pod(g)["volumes"][1]["hostPath"]["path"].startswith("/mnt/stateful_partition/")
    # a role whose pods talk no RDMA is not privileged even on GKE
    no_rdma = plan_of(REPO / "topologies" / "deepseek-r1-decode-2x8-h200.yaml", **{"cluster.network.rdma": False})
    (d,) = [d for d in L.render_lws(no_rdma, provider="gke") if d["kind"] == "LeaderWorkerSet"]
    assert pod(d)["containers"][0]["securityContext"]["allowPrivilegeEscalation"] is False


def test_resources_are_sized_from_the_plan_and_guaranteed():
    p = make_plan(load_topology(PD))
    docs = by_name(L.render_lws(p))
    pre = pod(docs[("LeaderWorkerSet", f"{p.name}-prefill")])
    dec = pod(docs[("LeaderWorkerSet", f"{p.name}-decode")])
    rp_pre, rp_dec = p.roles
    for spec, rp in ((pre, rp_pre), (dec, rp_dec)):
        res = spec["containers"][0]["resources"]
        assert res["requests"] == res["limits"] and qos_class(spec) == "Guaranteed"
        assert res["requests"]["cpu"] == "32"  # 4 per GPU, as llm-d's 32 for 8
        mem = int(res["requests"]["memory"].removesuffix("Gi"))
        assert mem >= 8 * (rp.memory.weights_gib + 8)  # each rank's weights + overhead (+ /dev/shm)
    assert int(pre["containers"][0]["resources"]["requests"]["memory"][:-2]) > int(
        dec["containers"][0]["resources"]["requests"]["memory"][:-2]
    )  # EP8 holds more experts per GPU than EP16
    over = pod(
        by_name(L.render_lws(p, cpu="48", memory="600Gi", ephemeral_storage="1Ti"))[
            ("LeaderWorkerSet", f"{p.name}-decode")
        ]
    )["containers"][0]["resources"]["requests"]
    assert (over["cpu"], over["memory"], over["ephemeral-storage"]) == ("48", "600Gi", "1Ti")
    roomy = pod(by_name(L.render_lws(p, model_cache="emptydir"))[("LeaderWorkerSet", f"{p.name}-decode")])
    assert int(roomy["containers"][0]["resources"]["requests"]["ephemeral-storage"][:-2]) > 600  # the model itself


@pytest.mark.parametrize(
    ("resources", "expected"),
    [
        ([{}], "BestEffort"),
        ([{"requests": {"cpu": "1"}}], "Burstable"),
        ([{"limits": {"cpu": "1", "memory": "1Gi"}}], "Guaranteed"),  # requests default to limits
        ([{"limits": {"cpu": "1", "memory": "1Gi"}, "requests": {"cpu": "500m", "memory": "1Gi"}}], "Burstable"),
        ([{"limits": {"cpu": "1", "memory": "1Gi"}}, {"requests": {"nvidia.com/gpu": "1"}}], "Burstable"),
    ],
)
def test_qos_class_follows_the_kubernetes_rules(resources, expected):
    """Kubernetes' QoS rules (pkg/apis/core/v1/helper/qos) re-implemented: no kubelet runs here."""
    spec = {"containers": [{"name": f"c{i}", "resources": r} for i, r in enumerate(resources)]}
    assert qos_class(spec) == expected


def test_start_budget_from_model_size_and_role():
    p = make_plan(load_topology(PD))
    pre, dec = (start_budget_s(p, rp) for rp in p.roles)
    assert 2400 <= pre < dec <= 3600  # DeepSeek-R1 wide-EP: ~45 min (llm-d: 2700 s probes)
    qwen = make_plan(load_topology(REPO / "topologies" / "qwen3-30b-a3b-1x2-h100.yaml"))
    assert start_budget_s(qwen, qwen.roles[0]) < pre  # a 30B model loads faster
    pinned = plan_of(PD, **{"vllm.ready_timeout_s": 1200})
    assert {start_budget_s(pinned, rp) for rp in pinned.roles} == {1200}  # the topology decides when it says
    docs = L.render_lws(p, start_budget_s=4000)
    for d in docs:
        if d["kind"] == "LeaderWorkerSet":
            c = pod(d)["containers"][0]
            assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] == 4000
            env = {e["name"]: e.get("value") for e in c["env"]}
            assert env["VLLM_ENGINE_READY_TIMEOUT_S"] == "4000"


def test_jit_caches_survive_group_recreation_and_model_cache_can_be_read_only():
    p = make_plan(load_topology(PD))
    d = next(d for d in L.render_lws(p) if d["kind"] == "LeaderWorkerSet")
    spec = pod(d)
    vols = {vol["name"]: vol for vol in spec["volumes"]}
    assert vols["jit-cache"]["persistentVolumeClaim"] == {"claimName": "jit-cache"}  # outlives the pod (generic)
    cw = pod(next(d for d in L.render_lws(p, provider="coreweave") if d["kind"] == "LeaderWorkerSet"))
    assert {v["name"]: v for v in cw["volumes"]}["jit-cache"]["hostPath"]["path"] == "/mnt/local/jit-cache"
    env = {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}
    for var in (
        "VLLM_CACHE_ROOT",
        "TRITON_CACHE_DIR",
        "CUDA_CACHE_PATH",
        "FLASHINFER_WORKSPACE_BASE",
        "DG_JIT_CACHE_DIR",
        "TORCHINDUCTOR_CACHE_DIR",
    ):
        assert env[var].startswith(L.JIT_MOUNT + "/")
    docs = L.render_lws(p, model_cache="pvc-ro:models", jit_cache="pvc:jit")
    d = next(d for d in docs if d["kind"] == "LeaderWorkerSet")
    spec = pod(d)
    vols = {vol["name"]: vol for vol in spec["volumes"]}
    assert vols["model-cache"]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}
    assert vols["jit-cache"]["persistentVolumeClaim"] == {"claimName": "jit"}
    mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
    assert mounts["model-cache"]["readOnly"] is True
    assert {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}["HF_HUB_OFFLINE"] == "1"
    ro = next(d for d in L.render_lws(p, model_cache="hostpath-ro:/models") if d["kind"] == "LeaderWorkerSet")
    assert pod(ro)["volumes"][1]["hostPath"] == {"path": "/models", "type": "Directory"}


def test_hardening_and_pod_security_levels():
    """Pod Security Standards (kubernetes.io) re-implemented for the controls widep's pods touch: no admission
    controller runs here."""
    cpu = make_plan(load_topology(REPO / "topologies" / "tiny-moe-cpu.yaml"))
    d = next(d for d in L.render_lws(cpu, model_cache="pvc:m", jit_cache="emptydir") if d["kind"] == "LeaderWorkerSet")
    spec = pod(d)
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"] == {"seccompProfile": {"type": "RuntimeDefault"}}
    assert spec["containers"][0]["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }
    level, why = pod_security_level(spec)
    assert level == "baseline" and why == ["container 'vllm' may run as root (vLLM images do)"]
    gpu = make_plan(load_topology(PD))
    d = next(d for d in L.render_lws(gpu, model_cache="pvc:m", jit_cache="pvc:j") if d["kind"] == "LeaderWorkerSet")
    level, why = pod_security_level(pod(d))
    # the curated topology names rdma/ib (issue 28 defect 6): SYS_RAWIO for the RDMA device
    assert level == "privileged" and why == ["container 'vllm' adds IPC_LOCK, SYS_RAWIO"]
    d = next(
        d
        for d in L.render_lws(gpu, model_cache="pvc:m", jit_cache="pvc:j", rdma_resource="none")
        if d["kind"] == "LeaderWorkerSet"
    )
    assert pod_security_level(pod(d)) == ("privileged", ["container 'vllm' adds IPC_LOCK"])  # no RDMA resource
    gke = next(
        d
        for d in L.render_lws(gpu, provider="gke", model_cache="pvc:m", jit_cache="pvc:j")
        if d["kind"] == "LeaderWorkerSet"
    )
    assert pod_security_level(pod(gke)) == ("privileged", ["container 'vllm' is privileged"])
    d = next(
        d
        for d in L.render_lws(gpu, provider="coreweave", model_cache="pvc:m", jit_cache="pvc:j")
        if d["kind"] == "LeaderWorkerSet"
    )
    assert pod_security_level(pod(d)) == ("privileged", ["container 'vllm' adds IPC_LOCK, SYS_RAWIO"])


def test_provider_header_reports_qos_and_pod_security(capsys):
    assert main(["lws", str(PD), "--provider", "gke"]) == 0
    head = [line for line in capsys.readouterr().out.splitlines() if line.startswith("#")]
    assert any("provider gke" in line for line in head)
    assert any("QoS Guaranteed" in line and "Pod Security level privileged" in line for line in head)


# --------------------------------------------------------------------------------------------
# kustomize


def test_json_patch_turns_one_document_into_the_other():
    old = {"a": {"b/c": 1, "gone": 2}, "l": [1, 2], "m": [1]}
    new = {"a": {"b/c": 3, "new": {"x": 1}}, "l": [1, 5], "m": [1, 2]}
    ops = json_patch(old, new)
    assert {"op": "replace", "path": "/a/b~1c", "value": 3} in ops
    assert {"op": "remove", "path": "/a/gone"} in ops
    assert {"op": "replace", "path": "/m", "value": [1, 2]} in ops
    assert {"op": "replace", "path": "/l/1", "value": 5} in ops


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is needed for `kubectl kustomize` (.ci/run installs Debian's kubernetes-client)")
    return kubectl


@pytest.mark.parametrize("front_door", ["router", "llm-d"])
def test_kustomize_overlays_build_with_real_kustomize(tmp_path, capsys, front_door):
    """Each overlay, built by a real kustomize, gives exactly what `widep lws --provider P` prints, and it
    validates."""
    out = tmp_path / "kz"
    assert main(["lws", str(PD), "--front-door", front_door, "--kustomize", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"wrote {out}/base/kustomization.yaml" in err
    assert (out / "base" / "router-values.yaml").is_file() == (front_door == "llm-d")
    p = make_plan(load_topology(PD))
    for name in ("generic", "coreweave", "gke"):
        built = subprocess.run(
            [_kubectl(), "kustomize", str(out / "overlays" / name)],
            capture_output=True,
            text=True,
            check=False,
            timeout=120,
        )
        assert built.returncode == 0, built.stderr
        got = [d for d in yaml.safe_load_all(built.stdout) if d]
        want = L.render_lws(p, provider=name, front_door=front_door)
        assert by_name(got) == by_name(yaml.safe_load_all(L.dump_manifests(want))), name
        # kustomize drops comments: the prerequisites the base file's header declares are given back to --validate
        head = "".join(f"# {line}\n" for line in L.prerequisite_lines(want))
        _, problems = v.validate_text(head + built.stdout)
        assert [pr.format() for pr in problems] == [], name
    assert not any((out / "overlays" / "generic").glob("*.patch.yaml"))  # the base is the generic profile


def test_llmd_refuses_a_vllm_bound_to_the_pod_ip_only():
    with pytest.raises(UserError, match="routing sidecar cannot front decode: it reaches vLLM on localhost"):
        L.render_lws(plan_of(PD, **{"serving.host": "node"}), front_door="llm-d")


def test_readme_kubernetes_examples_run(tmp_path, monkeypatch, capsys):
    """Every `widep lws topologies/...` line of README's Kubernetes section runs and exits 0 (outputs go to a
    temporary directory)."""
    import shlex

    text = (REPO / "README.md").read_text()
    section = text[text.index("## Kubernetes: LeaderWorkerSet") :]
    section = section[: section.index("\n## ", 10)]
    lines = [
        line.split("#")[0].split("&&")[0].split(">")[0].strip()
        for line in section.splitlines()
        if line.startswith("widep lws topologies/") and "..." not in line
    ]
    assert len(lines) >= 6
    monkeypatch.chdir(tmp_path)
    (tmp_path / "topologies").symlink_to(REPO / "topologies")
    for line in lines:
        args = shlex.split(line)[1:]
        assert main(args) == 0, (line, capsys.readouterr().err)
    assert (tmp_path / "pd.router-values.yaml").is_file() and (tmp_path / "deploy" / "overlays" / "gke").is_dir()


def test_kustomize_takes_no_output_file_or_provider(capsys, tmp_path):
    assert main(["lws", str(PD), "--kustomize", str(tmp_path), "--provider", "gke"]) == 2
    assert "Valid: --kustomize DIR alone" in capsys.readouterr().err


def test_checked_in_kustomize_trees_build_and_validate():
    """lws/kustomize/<topology>/ (written by python -m widep.k8s.regen) builds with a real kustomize into exactly
    the checked-in single-file output of each provider."""
    trees = sorted((REPO / "lws" / "kustomize").iterdir())
    assert trees
    for tree in trees:
        p = make_plan(load_topology(REPO / "topologies" / f"{tree.name}.yaml"))
        for overlay in sorted((tree / "overlays").iterdir()):
            built = subprocess.run(
                [_kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, check=False, timeout=120
            )
            assert built.returncode == 0, built.stderr
            docs = L.render_lws(p, provider=overlay.name)
            want = yaml.safe_load_all(L.dump_manifests(docs))
            assert by_name([d for d in yaml.safe_load_all(built.stdout) if d]) == by_name(want), overlay
            # kustomize drops comments: the base file's header declares the prerequisites
            head = "".join(f"# {line}\n" for line in L.prerequisite_lines(docs))
            _, problems = v.validate_text(head + built.stdout)
            assert problems == [], overlay
