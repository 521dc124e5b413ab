"""The Slurm backend's pure parts: options, the batch script, the srun steps, node binding, the sinfo fit check."""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from widep.errors import UserError
from widep.plan import plan as make_plan
from widep.plan.core import DeploymentPlan
from widep.render.vllm import RenderContext, render
from widep.run.launch import Launch, LaunchRequest, render_launch
from widep.run.slurm import (
    SlurmOptions,
    bind_addresses,
    check_fit,
    dry_run_text,
    parse_sinfo,
    sbatch_script,
    slurm_options,
    srun_argv,
    step_spec,
)
from widep.spec.topology import load_topology

ROOT = Path(__file__).parents[1]
TINY = ROOT / "topologies" / "tiny-moe-cpu.yaml"
PD = ROOT / "topologies" / "deepseek-r1-pd-3x8-h200.yaml"


def plan_of(path: Path) -> DeploymentPlan:
    return make_plan(load_topology(path))


def test_tiny_batch_script_exactly() -> None:
    opts = slurm_options(
        partition="debug",
        account="proj-1",
        qos="high",
        time="0-01:30:00",
        reservation="maint_2",
        constraint="h200&ib",
        sbatch_lines=("--mail-type=END",),
    )
    assert (
        sbatch_script(plan_of(TINY), opts, "/shared/runs/r")
        == """\
#!/bin/bash
# widep: one Slurm allocation for tiny-moe-cpu (1 node(s)).
# Plan node i runs on the i-th host of the allocation (scontrol show hostnames "$SLURM_JOB_NODELIST"):
#   host 0: plan node 0 (localhost): serve
#SBATCH --job-name=widep-tiny-moe-cpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --partition=debug
#SBATCH --account=proj-1
#SBATCH --qos=high
#SBATCH --time=0-01:30:00
#SBATCH --reservation=maint_2
#SBATCH --constraint=h200&ib
#SBATCH --output=/shared/runs/r/slurm-%j.out
#SBATCH --mail-type=END
set -euo pipefail
echo "widep: job $SLURM_JOB_ID holds $(scontrol show hostnames "$SLURM_JOB_NODELIST" | paste -sd,)"
# the driver (`widep launch --backend slurm` on the submitting host) starts one srun step per
# DP group and attempt in this allocation, and cancels the job when it stops
exec sleep infinity
"""
    )


def test_gpu_plan_asks_for_whole_gpu_nodes_and_steps_per_group() -> None:
    p = plan_of(PD)
    script = sbatch_script(p, SlurmOptions(), "/r")
    assert "#SBATCH --nodes=3\n" in script and "#SBATCH --gpus-per-node=8\n" in script
    assert "#SBATCH --exclusive\n" in script and "#SBATCH --ntasks-per-node=1\n" in script
    assert "#   host 0: plan node 0 (h200-0): prefill" in script
    assert "#   host 2: plan node 2 (h200-2): decode" in script
    argv = srun_argv(p, SlurmOptions(), "77", ["a", "b"], "decode", 2, "/r/attempt-2/decode/step.json", "/py", "/r")
    assert argv == (
        "srun",
        "--jobid=77",
        "--overlap",
        "--nodes=2",
        "--ntasks=2",
        "--ntasks-per-node=1",
        "--nodelist=a,b",
        "--kill-on-bad-exit=1",
        "--job-name=widep-decode-a2",
        "--gpus-per-node=8",
        "/py",
        "-m",
        "widep.run.slurm",
        "node",
        "/r/attempt-2/decode/step.json",
    )


def test_container_options_reach_every_step_with_the_run_dir_mounted() -> None:
    opts = slurm_options(container_image="nvcr.io#nvidia/vllm:25.01", container_mounts=("/lustre/m:/models:ro",))
    argv = srun_argv(plan_of(TINY), opts, "5", ["n0"], "serve", 0, "/r/s.json", "python3", "/r")
    assert "--container-image=nvcr.io#nvidia/vllm:25.01" in argv
    assert "--container-mounts=/lustre/m:/models:ro,/r:/r" in argv


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"time": "12h"}, "--time: '12h' is not a Slurm time limit. Valid: minutes, MM:SS, HH:MM:SS"),
        ({"partition": "gpu part"}, "--partition: 'gpu part' is not a Slurm name."),
        ({"account": "a;rm -rf /"}, "--account: 'a;rm -rf /' is not a Slurm name."),
        ({"constraint": "a b"}, "--constraint: 'a b' is not a Slurm constraint."),
        (
            {"sbatch_lines": ("--nodes=4",)},
            "--sbatch: '--nodes=4' sets --nodes, which widep sets from the plan's node count",
        ),
        ({"sbatch_lines": ("-p gpu",)}, "--sbatch: '-p gpu' sets -p, which widep sets from --partition"),
        ({"sbatch_lines": ("mail-type=END",)}, "--sbatch: 'mail-type=END' is not one sbatch option."),
        ({"sbatch_lines": ("--comment=a\n#SBATCH --nodes=9",)}, "is not one sbatch option"),
        ({"container_mounts": ("models:/models",)}, "--container-mounts: 'models:/models' is not a mount."),
        ({"container_image": "my image"}, "--container-image: 'my image' is not an image reference."),
    ],
)
def test_bad_options_are_refused_naming_the_flag(values: dict, message: str) -> None:
    with pytest.raises(UserError) as e:
        slurm_options(**values)
    assert message in str(e.value)
    assert e.value.exit_code == 2


@pytest.mark.parametrize("t", ["60", "30:00", "12:00:00", "2-0", "1-12:00", "1-00:00:00", "UNLIMITED"])
def test_slurm_time_formats_are_accepted(t: str) -> None:
    assert slurm_options(time=t).time == t


SINFO = "debug*|up|1|2|(null)|idle|n0\ndebug*|up|1|2|(null)|drained|n1\ngpu|up|4|64|gpu:h200:8(S:0-1)|idle|g[0-3]\n"


def test_sinfo_is_summed_per_partition() -> None:
    parts = {p.name: p for p in parse_sinfo(SINFO)}
    assert parts["debug"].default and parts["debug"].nodes == 2 and parts["debug"].usable == 1
    assert parts["gpu"].gpus == 8 and parts["gpu"].cpus == 64 and not parts["gpu"].default


def test_fit_refusals_carry_the_sinfo_facts() -> None:
    parts = parse_sinfo(SINFO)
    with pytest.raises(UserError) as e:
        check_fit(plan_of(TINY), slurm_options(partition="gpux"), parts)
    assert str(e.value).startswith(
        "--partition: 'gpux' is not a partition of this cluster. Did you mean 'gpu'? "
        "Given: gpux. Valid: debug, gpu. sinfo: debug (default): 2 node(s), 1 usable"
    )
    assert str(e.value).endswith("Nothing was submitted.")
    with pytest.raises(UserError) as e:
        check_fit(plan_of(PD), SlurmOptions(), parts)  # 3 nodes into the default partition, 1 usable node
    assert "the plan needs 3 node(s) (one job, --nodes=3) but partition 'debug' has 2 node(s), 1 usable" in str(e.value)
    assert "1 drained (n1)" in str(e.value)
    assert check_fit(plan_of(PD), slurm_options(partition="gpu"), parts).name == "gpu"
    eight = "gpu|up|4|64|gpu:4|idle|g[0-3]\n"
    with pytest.raises(UserError, match="needs 8 GPUs per node but the nodes of partition 'gpu' have 4"):
        check_fit(plan_of(PD), slurm_options(partition="gpu"), parse_sinfo(eight))


def _launch(path: Path, opts: SlurmOptions, **req: object) -> Launch:
    p = plan_of(path)
    return render_launch(
        LaunchRequest(p, backend="slurm", run_dir=Path("/shared/run"), slurm=opts, **req),
        RenderContext(model_path="/models/m"),
        "run1",
    )


def test_allocation_binding_keeps_rank_node_gpu_of_render() -> None:
    """Plan node i <-> i-th host: only addresses change; every process's rank, node and GPUs are `widep render`'s."""
    launch = _launch(PD, SlurmOptions())
    bound = bind_addresses(launch, {0: "10.1.0.7", 1: "10.1.0.8", 2: "10.1.0.9"})
    rendered = render(launch.plan, RenderContext(model_path="/models/m"))
    assert [(c.name, c.node, c.gpus, c.dp_rank) for c in bound.processes] == [
        (c.name, c.node, c.gpus, c.dp_rank) for c in rendered
    ]
    decode = next(g for g in bound.groups if g.role == "decode")
    for c in decode.processes:
        assert c.node_address == {1: "10.1.0.8", 2: "10.1.0.9"}[c.node]
        argv = list(c.argv)
        assert argv[argv.index("--data-parallel-address") + 1] == "10.1.0.8"  # the group leader: plan node 1
    spec = step_spec(bound, decode, 3, {0: "g0", 1: "g1", 2: "g2"})
    assert spec["attempt"] == 3 and {p["host"] for p in spec["processes"]} == {"g1", "g2"}
    assert all(p["argv"] == list(c.argv) for p, c in zip(spec["processes"], decode.processes, strict=True))


def test_dry_run_quotes_every_value_for_the_shell(tmp_path: Path) -> None:
    launch = _launch(
        TINY, slurm_options(detach=True), topology=Path("/topo dir/it's.yaml"), python="/opt/my env/bin/python"
    )
    text = dry_run_text(launch, launch.request.slurm, "/opt/my env/bin/python")
    exec_line = next(line for line in text.splitlines() if line.startswith("exec "))
    argv = shlex.split(exec_line)[1:]
    assert argv[:4] == ["/opt/my env/bin/python", "-m", "widep", "launch"]
    assert argv[4] == "/topo dir/it's.yaml" and argv[argv.index("--python") + 1] == "/opt/my env/bin/python"
    script = text.split("\n", 1)[1].split("\n# group ")[0]
    (tmp_path / "s.sh").write_text(script)
    assert subprocess.run(["bash", "-n", str(tmp_path / "s.sh")], check=False).returncode == 0
    srun = next(line for line in text.splitlines() if line.startswith("srun "))
    assert shlex.split(srun)[-5:] == [
        "/opt/my env/bin/python",
        "-m",
        "widep.run.slurm",
        "node",
        "/shared/run/attempt-0/serve/step.json",
    ]


def test_names_from_the_topology_cannot_add_lines_to_the_batch_script() -> None:
    """A topology name or node name with a newline stays inside its comment; the job name keeps Slurm's charset."""
    p = plan_of(TINY)
    node = p.nodes[0].model_copy(update={"name": "n0\n#SBATCH --nodes=99\nrm -rf /"})
    p = replace(p, nodes=(node,), spec=p.spec.model_copy(update={"name": "x y\nexec evil"}))
    script = sbatch_script(p, SlurmOptions(), "/r")
    assert "\nrm -rf /" not in script and "\n#SBATCH --nodes=99" not in script and "\nexec evil" not in script
    assert "#SBATCH --job-name=widep-x-y-exec-evil\n" in script
    assert "#   host 0: plan node 0 (n0\\n#SBATCH --nodes=99\\nrm -rf /): serve" in script
