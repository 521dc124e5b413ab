"""The cross-object check of ``widep lws --validate`` (widep/k8s/validate/cross.py): every class of problem that each
single-object validator passes but a cluster breaks on, reproduced by hand-breaking widep's own manifests (real
planner, real shipped CRDs); each must be rejected with the field named, and widep's own output must pass."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from widep.k8s import lws as L
from widep.k8s import validate as v
from widep.plan import plan as make_plan
from widep.spec.topology import load_topology

REPO = Path(__file__).resolve().parents[1]
PD_DP2 = REPO / "topologies" / "tiny-moe-cpu-pd-dp2.yaml"
DEEPSEEK_PD = REPO / "topologies" / "deepseek-r1-pd-3x8-h200.yaml"


def rendered(path: Path = PD_DP2, **options) -> list[dict]:
    return L.render_lws(make_plan(load_topology(path)), **options)


def cross(docs: list[dict], header: bool = True, extra: str = "") -> list[v.Problem]:
    head = "".join(f"# {line}\n" for line in L.prerequisite_lines(docs)) if header else ""
    head += extra
    _, problems = v.validate_text(head + L.dump_manifests(docs))
    return [p for p in problems if p.layer == "cross-object" and p.failing]


def by(docs: list[dict], kind: str, suffix: str = "") -> dict:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix))


def router(docs: list[dict]) -> dict:
    return by(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


@pytest.mark.parametrize("placement", ["pod-per-node", "pod-per-rank"])
def test_widep_output_passes(placement):
    assert [p.format() for p in cross(rendered(placement=placement))] == []


def test_router_url_to_a_port_nobody_serves_is_rejected():
    """Defect 3: pod-per-rank router URLs used bare-metal rank ports (base+rank)."""
    docs = rendered(placement="pod-per-rank")
    args = router(docs)["args"]
    i = next(j for j, a in enumerate(args) if a.endswith("-decode-0-1.tiny-moe-cpu-pd-dp2-decode:8410"))
    args[i] = args[i].replace(":8410", ":8411")
    (p,) = cross(docs)
    assert p.path == f"spec.template.spec.containers[0].args[{i}]"
    assert "port 8411 is no port pod tiny-moe-cpu-pd-dp2-decode-0-1" in p.message and "Valid: 8410" in p.message


def test_router_url_to_a_pod_the_group_does_not_have_is_rejected():
    docs = rendered(placement="pod-per-rank")
    args = router(docs)["args"]
    i = next(j for j, a in enumerate(args) if "-decode-0-1." in a)
    args[i] = args[i].replace("-decode-0-1.", "-decode-0-2.")
    (p,) = cross(docs)
    assert p.path.endswith(f"args[{i}]") and "size 2" in p.message


def test_router_liveness_probe_shorter_than_its_wait_is_rejected():
    """Defect 2: the router opens no port until every worker is healthy; liveness must not kill it meanwhile."""
    docs = rendered()
    c = router(docs)
    assert c["startupProbe"]["failureThreshold"] * c["startupProbe"]["periodSeconds"] >= 300
    c.pop("startupProbe")
    (p,) = cross(docs)
    assert p.path == "spec.template.spec.containers[0].livenessProbe"
    assert "--worker-startup-timeout-secs 300" in p.message and "startupProbe allowing >= 300 s" in p.message
    c["startupProbe"] = {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10, "failureThreshold": 3}
    (p,) = cross(docs)
    assert p.path == "spec.template.spec.containers[0].startupProbe.failureThreshold" and "30 s" in p.message


def test_vllm_startup_probe_shorter_than_engine_ready_timeout_is_rejected():
    docs = rendered(DEEPSEEK_PD)
    lws = by(docs, "LeaderWorkerSet", "-decode")
    c = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]
    c["startupProbe"]["failureThreshold"] = 2
    (p,) = cross(docs)
    assert p.path == "spec.leaderWorkerTemplate.workerTemplate.spec.containers[0].startupProbe.failureThreshold"
    assert "VLLM_ENGINE_READY_TIMEOUT_S" in p.message


def test_service_selector_matching_no_pod_is_rejected():
    docs = rendered()
    svc = by(docs, "Service", "-decode-api")
    svc["spec"]["selector"]["leaderworkerset.sigs.k8s.io/name"] = "tiny-moe-cpu-pd-dp2-decoder"
    problems = cross(docs)
    assert [p.path for p in problems if p.name.endswith("-decode-api")] == ["spec.selector"]
    assert "selects no pod" in problems[0].message


def test_service_target_port_nobody_listens_on_is_rejected():
    docs = rendered()
    svc = by(docs, "Service", "-decode-api")
    svc["spec"]["ports"][0]["targetPort"] = 9999
    (p,) = cross(docs)
    assert p.path == "spec.ports[0].targetPort" and "9999 is no port" in p.message and "Valid: 8410" in p.message
    svc["spec"]["ports"][0]["targetPort"] = "htttp"
    (p,) = cross(docs)
    assert "'htttp' names no containerPort" in p.message


def with_chart_pool(docs: list[dict]) -> list[dict]:
    """llm-d's manifests plus the InferencePool the router chart creates from widep's values for them."""
    from widep.k8s.frontdoor import chart_pool

    p = make_plan(load_topology(DEEPSEEK_PD))
    return docs + [chart_pool(p.name, L.router_values_for(p, docs))]


def test_inference_pool_ports_selector_and_endpoint_picker():
    """Defects 4 and 8: the pool's endpoint picker Service must exist or be a declared prerequisite; the pool the
    router chart creates selects both roles' pods on ports they serve."""
    # the pool as a user would keep it in the file, the chart installed with its own pool turned off
    docs = with_chart_pool(rendered(DEEPSEEK_PD, front_door="llm-d", namespace="llm"))
    epp = "# prerequisite: Service/deepseek-r1-pd-3x8-h200-epp\n"
    pool = by(docs, "InferencePool")
    assert cross(docs, header=False, extra=epp) == []
    (p,) = cross(docs, header=False)
    assert p.path == "spec.endpointPickerRef.name" and "deepseek-r1-pd-3x8-h200-epp" in p.message
    broken = copy.deepcopy(docs)
    by(broken, "InferencePool")["spec"]["targetPorts"][0]["number"] = 8999
    problems = cross(broken, header=False, extra=epp)  # one per pod template it selects (prefill, decode)
    assert {p.path for p in problems} == {"spec.targetPorts[0].number"} and len(problems) >= 2
    assert all("8999 is no port" in p.message for p in problems)
    pool["spec"]["selector"]["matchLabels"]["llm-d.ai/inference-serving"] = "yes"
    (p,) = cross(docs, header=False, extra=epp)
    assert p.path == "spec.selector.matchLabels" and "selects no pod" in p.message


def test_inference_pool_owned_twice_with_the_router_chart():
    """Defect 1: widep emitted InferencePool/<name> and told the user to helm install llm-d's router chart, which
    creates an InferencePool of the same name. The check flags an object of the file that a chart named in the
    header also creates; widep's llm-d output now has no pool of its own (the chart's values make it)."""
    from widep.k8s import frontdoor

    p = make_plan(load_topology(DEEPSEEK_PD))
    docs = rendered(DEEPSEEK_PD, front_door="llm-d")
    assert "InferencePool" not in {d["kind"] for d in docs}
    assert cross(docs) == []
    head = "".join(f"# {line}\n" for line in L.prerequisite_lines(docs))
    assert f"helm install {p.name} {frontdoor.ROUTER_CHART}" in head
    # the output of last round: the same pool in the file as well
    twice = with_chart_pool(docs)
    (problem,) = cross(twice)
    assert (problem.kind, problem.name, problem.path) == ("InferencePool", p.name, "metadata.name")
    assert (
        f"helm install {p.name} {frontdoor.ROUTER_CHART}" in problem.message and "Valid: remove it" in problem.message
    )
    # any other object the chart makes, by a user file that names the chart with `helm upgrade --install`
    svc = copy.deepcopy(by(docs, "Service", "-decode-api"))
    svc["metadata"]["name"] = frontdoor.epp_name(p.name)
    text = f"# then: helm upgrade --install {p.name} llm-d/llm-d-router-standalone -f v.yaml\n" + L.dump_manifests(
        docs + [svc]
    )
    _, problems = v.validate_text(text)
    (problem,) = [x for x in problems if x.layer == "cross-object" and x.failing]
    assert problem.name == f"{p.name}-epp" and "also creates Service/" in problem.message
    # a chart installed with its pool turned off creates none: a pool of the file is then the only one
    off = f"# helm install {p.name} {frontdoor.ROUTER_CHART} --set router.inferencePool.create=false\n"
    _, problems = v.validate_text(off + L.dump_manifests(twice))
    assert [x for x in problems if x.layer == "cross-object" and x.failing and x.kind == "InferencePool"] == []
    # names come from one place: the release's endpoint picker, the values' pool and the chart's object list agree
    values = L.router_values_for(p, docs)
    pool = frontdoor.chart_pool(frontdoor.chart_release(p), values)
    assert ("InferencePool", pool["metadata"]["name"]) in frontdoor.chart_objects(p.name)
    assert ("Service", pool["spec"]["endpointPickerRef"]["name"]) in frontdoor.chart_objects(p.name)
    assert frontdoor.epp_name("x" * 50) == "x" * 40 + "-epp"  # the chart's trunc 40
    # defect 4 by the same mechanism: a pool (chart off) naming the untruncated Service of a 41-character release
    long = "n" * 41
    pool = frontdoor.chart_pool(long, values)
    pool["spec"]["endpointPickerRef"]["name"] = f"{long}-epp"
    head = f"# helm install {long} {frontdoor.ROUTER_CHART} --set router.inferencePool.create=false\n"
    _, problems = v.validate_text(head + L.dump_manifests(docs + [pool]))
    (problem,) = [x for x in problems if x.layer == "cross-object" and x.failing]
    assert problem.path == "spec.endpointPickerRef.name" and f"Service/{long}-epp is neither" in problem.message


def test_generic_multi_node_deepep_needs_an_rdma_choice(tmp_path):
    """Defect 6: generic provider, DeepEP across the pods of a group, no RDMA device: exit 2 naming the field,
    unless the topology (or --rdma-resource) says how pods get RDMA."""
    import yaml

    from widep.cli import main
    from widep.errors import UserError

    topo = yaml.safe_load(DEEPSEEK_PD.read_text())
    del topo["cluster"]["network"]["rdma_resource"]
    bare = tmp_path / "bare.yaml"
    bare.write_text(yaml.safe_dump(topo))
    with pytest.raises(UserError, match=r"^cluster\.network\.rdma_resource: role 'decode' runs deepep") as err:
        rendered(bare)
    assert err.value.exit_code == 2 and "Valid: your cluster's RDMA device plugin resource" in str(err.value)
    assert main(["lws", str(bare)]) == 2
    # explicit choices: a resource, 'none', or a profile with RDMA wiring
    assert "rdma/roce_gdr" in str(rendered(bare, rdma_resource="rdma/roce_gdr"))
    assert "rdma/" not in L.dump_manifests(rendered(bare, rdma_resource="none"))
    assert cross(rendered(bare, provider="gke")) == []
    # the check: DeepEP across the pods of a group with no RDMA device, network or declaration (widep's output of
    # last round, which said so only in a note) fails --validate naming the LWS size and what is valid
    topo["cluster"]["network"]["rdma_resource"] = "none"
    bare.write_text(yaml.safe_dump(topo))
    docs = rendered(bare)
    problems = cross(docs)
    assert problems and {(p.kind, p.path) for p in problems} == {("LeaderWorkerSet", "spec.leaderWorkerTemplate.size")}
    assert "run deepep_low_latency between them" in problems[0].message and "rdma/ib: 1" in problems[0].message
    assert cross(docs, extra="# rdma: none (the cluster attaches HCAs)\n") == []  # the explicit choice, declared
    text = L.dump_manifests(
        docs, L.header_lines(make_plan(load_topology(bare)), "widep lws", docs=docs, opts=L.LWSOptions())
    )
    assert "# rdma: none" in text and [p for p in v.validate_text(text)[1] if p.failing] == []  # widep's own header
    assert main(["lws", str(bare)]) == 0
    assert cross(rendered(bare, rdma_resource="rdma/ib")) == []  # a device request
    assert cross(rendered(bare, provider="gke")) == []  # a network annotation
    topo["cluster"]["network"]["rdma_resource"] = "ib"  # not domain-qualified
    bare.write_text(yaml.safe_dump(topo))
    with pytest.raises(UserError, match=r"^cluster\.network\.rdma_resource: extended resources are domain") as err:
        rendered(bare)
    assert err.value.exit_code == 2
    # the curated topology names its resource; a profile with its own wiring keeps it (gke requests no rdma/ib)
    assert "rdma/ib" in str(rendered(DEEPSEEK_PD))
    assert "rdma/ib" not in str(rendered(DEEPSEEK_PD, provider="gke"))


def test_env_with_value_and_value_from_is_rejected():
    docs = rendered()
    c = by(docs, "LeaderWorkerSet", "-prefill")["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]
    env = c["containers"][0]["env"]
    env[0] = {"name": env[0]["name"], "value": "x", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    (p,) = cross(docs)
    assert p.severity == "error" and p.path == "spec.leaderWorkerTemplate.workerTemplate.spec.containers[0].env[0]"
    assert "both value and valueFrom" in p.message


def test_lws_size_against_the_scripts_rank_arithmetic():
    docs = rendered(placement="pod-per-rank")
    by(docs, "LeaderWorkerSet", "-decode")["spec"]["leaderWorkerTemplate"]["size"] = 3
    problems = [p for p in cross(docs) if p.kind == "LeaderWorkerSet"]
    assert [p.path for p in problems] == ["spec.leaderWorkerTemplate.size"]
    assert "groups of 2 pods" in problems[0].message and "Valid: 2" in problems[0].message


def test_undeclared_secret_is_a_note_and_a_declared_one_is_silent():
    docs = rendered()
    c = by(docs, "LeaderWorkerSet", "-prefill")["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]
    c["containers"][0]["env"].append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "t"}}})
    assert "prerequisite: Secret/hf (create it in the target namespace first)" in L.prerequisite_lines(docs)
    assert cross(docs) == []
    _, problems = v.validate_text(L.dump_manifests(docs))
    (p,) = [p for p in problems if p.layer == "cross-object" and "Secret/" in p.message]
    assert p.severity == "note" and p.path.endswith("valueFrom.secretKeyRef.name") and "Secret/hf" in p.message


def test_router_has_no_api_key_env():
    """Defect 8: vllm-router does not read VLLM_API_KEY (it forwards the client's Authorization header)."""
    assert "env" not in router(rendered())


def test_lws_rollout_surges_instead_of_taking_the_only_group_down():
    for d in rendered():
        if d["kind"] == "LeaderWorkerSet":
            assert d["spec"]["rolloutStrategy"]["rollingUpdateConfiguration"] == {"maxUnavailable": 0, "maxSurge": 1}


def test_llmd_front_door_bounds_the_release_name(tmp_path):
    """Defect 4: the chart truncates long release names in the endpoint picker Service's name."""
    import yaml

    from widep.errors import UserError
    from widep.k8s.frontdoor import ROUTER_RELEASE_MAX

    topo = yaml.safe_load(DEEPSEEK_PD.read_text())
    for length, fails in ((ROUTER_RELEASE_MAX, False), (ROUTER_RELEASE_MAX + 1, True)):
        topo["name"] = "n" * length
        path = tmp_path / f"t{length}.yaml"
        path.write_text(yaml.safe_dump(topo))
        if fails:
            with pytest.raises(UserError, match=f"at most {ROUTER_RELEASE_MAX} characters"):
                rendered(path, front_door="llm-d")
        else:
            assert cross(rendered(path, front_door="llm-d")) == []


def test_generic_caches_are_claims_coreweave_keeps_local_nvme():
    """Defect 7: no hostPath on the node's root disk by default outside CoreWeave."""
    for provider, want in (("generic", "persistentVolumeClaim"), ("coreweave", "hostPath")):
        lws = by(rendered(provider=provider), "LeaderWorkerSet", "-decode")
        vols = {x["name"]: x for x in lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["volumes"]}
        assert want in vols["model-cache"] and want in vols["jit-cache"], provider
    assert "prerequisite: PersistentVolumeClaim/hf-cache (create it in the target namespace first)" in (
        L.prerequisite_lines(rendered())
    )


def test_gke_a3_ultra_rdma_network_resources_are_zero():
    """Defect 5: llm-d's GKE overlay requests networking.gke.io.networks/rdma-0..7 as "0" on RDMA pods."""
    lws = by(rendered(DEEPSEEK_PD, provider="gke"), "LeaderWorkerSet", "-decode")
    c = lws["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]
    for i in range(8):
        assert c["resources"]["limits"][f"networking.gke.io.networks/rdma-{i}"] == "0"
        assert c["resources"]["requests"][f"networking.gke.io.networks/rdma-{i}"] == "0"
    assert cross(rendered(DEEPSEEK_PD, provider="gke")) == []


def _router_binary() -> str | None:
    import os
    import shutil
    import sys

    here = os.path.join(os.path.dirname(sys.executable), "vllm-router")
    return here if os.path.exists(here) else shutil.which("vllm-router")


@pytest.mark.skipif(_router_binary() is None, reason="vllm-router is not installed (scripts/dev installs it)")
def test_real_router_opens_no_port_while_workers_start_and_the_emitted_probes_wait_for_it():
    """Defect 2 with the real vllm-router binary: it answers nothing (connection refused) until every worker is
    healthy, so a liveness probe shorter than the workers' start would kill it; the emitted startupProbe allows
    the whole --worker-startup-timeout-secs. The worker is a tiny HTTP stub (test double: a CPU vLLM that becomes
    healthy late on purpose would take minutes here); it answers /health 503 for its first seconds, then 200."""
    import http.server
    import subprocess
    import threading
    import time
    import urllib.error
    import urllib.request

    from launch_helpers import free_ports

    late_s = 4.0
    start = time.monotonic()

    class Late(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = b'{"object":"list","data":[{"id":"m"}]}' if self.path.startswith("/v1/models") else b"{}"
            self.send_response(200 if time.monotonic() - start >= late_s else 503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    worker_port, port, prom = free_ports(3)
    stub = http.server.ThreadingHTTPServer(("127.0.0.1", worker_port), Late)
    threading.Thread(target=stub.serve_forever, daemon=True).start()
    c = router(rendered(PD_DP2))
    args = c["args"]
    wait_s = int(args[args.index("--worker-startup-timeout-secs") + 1])
    probe = c["startupProbe"]
    budget = probe["periodSeconds"] * probe["failureThreshold"] + probe.get("initialDelaySeconds", 0)
    assert budget >= wait_s and "initialDelaySeconds" not in c["livenessProbe"]
    argv = [_router_binary(), "--host", "127.0.0.1", "--port", str(port), "--prometheus-port", str(prom)]
    argv += ["--worker-urls", f"http://127.0.0.1:{worker_port}", "--policy", "round_robin"]
    argv += ["--worker-startup-timeout-secs", str(wait_s), "--health-check-interval-secs", "1"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    refused_while_late, healthy_at = 0, None
    try:
        # the kubelet's schedule, compressed: probe /health until the startup budget is spent
        while time.monotonic() - start < min(budget, 90):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if r.status == 200:
                        healthy_at = time.monotonic() - start
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() - start < late_s:
                    refused_while_late += 1
            time.sleep(0.5)
    finally:
        proc.kill()
        proc.wait(timeout=10)
        stub.shutdown()
    assert refused_while_late > 0  # no port while the worker is not healthy: a liveness probe would fail
    assert healthy_at is not None and late_s <= healthy_at <= budget, healthy_at


# --------------------------------------------------------------------------------------------
# issue 32 class 4: no variable of the pod's env makes a probe's (or the pod's) shell run code


def _probes(docs: list[dict]):
    from widep.k8s.validate.cross import collect_pods

    pods, _ = collect_pods(docs)
    for pod in pods:
        spec = pod.template.get("spec") or {}
        for c in list(spec.get("initContainers") or []) + list(spec.get("containers") or []):
            for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
                if kind in c:
                    yield pod.owner, c, kind, c[kind]


def test_probes_need_no_shell_where_http_does_and_no_startup_files_where_exec_does():
    """Every probe of every checked-in lws/ file is httpGet/tcpSocket, or (several rank ports: a probe tests one
    port) an exec of bash in privileged mode with no startup files; every pod's own bash starts the same way."""
    import yaml

    kinds = set()
    for f in sorted((REPO / "lws").glob("*.yaml")):
        docs = [d for d in yaml.safe_load_all(f.read_text()) if d]
        for owner, _c, kind, probe in _probes(docs):
            (action,) = {"httpGet", "tcpSocket", "exec", "grpc"} & set(probe)
            kinds.add(action)
            if action == "exec":
                assert tuple(probe["exec"]["command"][:5]) == L.POD_BASH, (f.name, owner, kind)
                script = probe["exec"]["command"][5]
                assert script.count("/dev/tcp/") == 1 and "for port in" in script  # several ports: one probe
        for d in docs:
            if d["kind"] == "LeaderWorkerSet":
                for tpl in (
                    d["spec"]["leaderWorkerTemplate"].get("leaderTemplate"),
                    d["spec"]["leaderWorkerTemplate"]["workerTemplate"],
                ):
                    if tpl:
                        assert tuple(tpl["spec"]["containers"][0]["command"]) == L.POD_BASH, f.name
    assert kinds == {"httpGet", "exec"}
    # a pod with one health port is probed over HTTP, with no shell at all
    single = rendered(REPO / "topologies" / "tiny-moe-cpu.yaml")
    assert {next(iter({"httpGet", "exec"} & set(p))) for *_, p in _probes(single)} == {"httpGet"}


def test_exec_probe_and_pod_bash_ignore_shell_startup_variables(tmp_path):
    """The emitted exec probe, executed by bash with hostile startup variables in its env (what a pod's env could
    carry if the topology check missed one), runs none of them and still tells healthy from unhealthy ranks."""
    import http.server
    import subprocess
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(self.server.status)
            self.end_headers()

        def log_message(self, *args):
            pass

    servers = []
    for status in (200, 200, 503):
        srv = http.server.HTTPServer(("127.0.0.1", 0), Health)
        srv.status = status
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
    ok = [s.server_address[1] for s in servers[:2]]
    bad = servers[2].server_address[1]
    docs = rendered(REPO / "topologies" / "tiny-moe-cpu-ep2.yaml")
    (_, _, _, probe) = next(x for x in _probes(docs) if x[2] == "livenessProbe")
    command = list(probe["exec"]["command"])
    marks = [tmp_path / f"ran-{i}" for i in range(6)]
    payload = tmp_path / "payload.sh"
    payload.write_text(f"touch {marks[0]}\n")
    hostile = {
        "PATH": "/usr/bin:/bin",
        "POD_IP": "127.0.0.1",
        "BASH_ENV": str(payload),
        "ENV": str(payload),
        "SHELLOPTS": "xtrace",
        "PS4": f"$(touch {marks[1]})",
        "BASH_FUNC_exec%%": f"() {{ touch {marks[2]}; }}",
        "BASH_FUNC_printf%%": f"() {{ touch {marks[3]}; }}",
        "BASH_FUNC_read%%": f"() {{ touch {marks[4]}; }}",
        "PROMPT_COMMAND": f"touch {marks[5]}",
    }
    try:
        for ports, want in ((ok, 0), (ok + [bad], 1)):
            script = command[-1].replace("for port in 8000 8001;", f"for port in {' '.join(map(str, ports))};")
            assert script != command[-1]
            got = subprocess.run([*command[:-1], script], env=hostile, timeout=30, capture_output=True, text=True)
            assert got.returncode == want, got.stderr
            assert "+ " not in got.stderr  # SHELLOPTS=xtrace was not imported
        # the pod's own bash starts the same way
        c = by(docs, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]["containers"][0]
        got = subprocess.run([*c["command"], "exit 0"], env=hostile, timeout=30, capture_output=True, text=True)
        assert got.returncode == 0 and got.stderr == ""
    finally:
        for s in servers:
            s.shutdown()
    assert [m.name for m in marks if m.exists()] == []
    # the same command without privileged mode would have run the payload (the test can fail)
    subprocess.run(["/bin/bash", "-c", "exit 0"], env=hostile, timeout=30, capture_output=True)
    assert marks[0].exists()


# --------------------------------------------------------------------------------------------
# item 8: images for the device, current kustomize fields, prerequisites via --explain


def test_cpu_topologies_get_a_cpu_image_and_cuda_images_are_refused_for_them(tmp_path):
    import yaml

    from widep.errors import UserError

    cpu = REPO / "topologies" / "tiny-moe-cpu.yaml"
    images = {c["image"] for d in rendered(cpu) if d["kind"] == "LeaderWorkerSet" for c in _containers_of(d)}
    assert images == {f"{L.CPU_IMAGE_REPO}:v0.32.0"}
    images = {c["image"] for d in rendered(DEEPSEEK_PD) if d["kind"] == "LeaderWorkerSet" for c in _containers_of(d)}
    assert images == {"vllm/vllm-openai:v0.34.0"}  # GPUs keep vLLM's CUDA image (the 0.34 default line)
    for given in ("vllm/vllm-openai:v0.32.0", "docker.io/vllm/vllm-openai@sha256:" + "a" * 64):
        with pytest.raises(UserError, match=r"^--image: .* is vLLM's CUDA image, but cluster.gpu is CPU") as err:
            rendered(cpu, image=given)
        assert err.value.exit_code == 2
    topo = yaml.safe_load(cpu.read_text())
    topo["vllm"]["image"] = "vllm/vllm-openai:v0.32.0"
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(topo))
    with pytest.raises(UserError, match=r"^vllm\.image: "):
        rendered(tmp_path / "t.yaml")
    with pytest.raises(UserError, match=r"^--image: .* is vLLM's CPU build"):
        rendered(DEEPSEEK_PD, image=f"{L.CPU_IMAGE_REPO}:v0.32.0")
    assert "my.registry/vllm-cpu:1" in str(rendered(cpu, image="my.registry/vllm-cpu:1"))  # own builds pass


def _containers_of(lws: dict) -> list[dict]:
    lwt = lws["spec"]["leaderWorkerTemplate"]
    return [c for t in (lwt.get("leaderTemplate"), lwt["workerTemplate"]) if t for c in t["spec"]["containers"]]


def test_kustomize_overlays_use_current_fields_and_build_without_deprecation_warnings():
    import shutil
    import subprocess

    trees = sorted((REPO / "lws" / "kustomize").glob("*/overlays/*/kustomization.yaml"))
    assert trees
    for k in trees:
        text = k.read_text()
        assert "bases:" not in text and "patchesJson6902" not in text and "resources:\n- ../../base" in text
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is needed for `kubectl kustomize` (.ci/run installs Debian's kubernetes-client)")
    built = subprocess.run([kubectl, "kustomize", str(trees[0].parent)], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0 and "deprecat" not in built.stderr.lower(), built.stderr


def test_explain_lists_prerequisites_in_order_pod_failure_and_what_only_a_cluster_proves(capsys):
    from widep.cli import main

    assert main(["lws", str(DEEPSEEK_PD), "--front-door", "llm-d", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "kind:" not in out  # no manifests
    steps = [line.split(". ", 1)[1] for line in out.splitlines() if line[:5].strip()[:-1].isdigit()]
    assert steps[0].startswith("the LeaderWorkerSet CRD") and steps[-1].startswith("then: kubectl apply")
    assert any(s.startswith("llm-d's router chart: helm install deepseek-r1-pd-3x8-h200") for s in steps)
    assert "pod failure (deepseek-r1-pd-3x8-h200-decode, restartPolicy RecreateGroupOnPodRestart)" in out
    assert "Not verifiable from the manifests" in out and "ibv_devinfo" in out and "kubectl get events" in out
    assert main(["lws", str(PD_DP2), "--explain", "-o", "/tmp/x.yaml"]) == 2
    assert main(["lws", "--explain"]) == 2
    capsys.readouterr()
