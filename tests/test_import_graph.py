"""The shape of widep's code, read from its source with Python's own parser (every import that runs, also those
inside functions): no import cycle among the modules of ``widep.run``, no module below the CLI importing a CLI module,
the commands of a launch rendered in one place, and nothing in ``k8s/`` or ``run/`` searching argv for flags."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).parents[1] / "widep"


def module_name(path: Path) -> str:
    parts = path.relative_to(PKG.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PKG.rglob("*.py")}
TREES = {name: ast.parse(p.read_text(), str(p)) for name, p in MODULES.items()}


def runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` outside ``if TYPE_CHECKING:`` blocks (type-only imports never run)."""
    skip = {
        id(n)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
        for stmt in block.body
        for n in ast.walk(stmt)
    }
    return [n for n in ast.walk(tree) if id(n) not in skip]


def imports_of(name: str) -> set[str]:
    """widep modules ``name`` imports when it runs (``from a import b`` counts as a.b when that is a module)."""
    out: set[str] = set()
    pkg = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    for node in runtime_nodes(TREES[name]):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in out if m in MODULES and m != name}


def is_cli(name: str) -> bool:
    """A command-line module: it defines a click command or group (or is ``python -m widep``)."""
    if name == "widep.__main__":
        return True
    decorators = [ast.unparse(d) for n in TREES[name].body if isinstance(n, ast.FunctionDef) for d in n.decorator_list]
    return any(d.startswith(("click.command", "click.group")) for d in decorators)


def test_no_module_below_the_cli_imports_a_cli_module():
    assert {"widep.cli", "widep.run.cli", "widep.model_cli", "widep.k8s.regen"} <= {m for m in MODULES if is_cli(m)}
    assert not is_cli("widep.tinymoe") and not is_cli("widep.run.ray_backend")
    bad = sorted(f"{m} imports {i}" for m in MODULES if not is_cli(m) for i in imports_of(m) if is_cli(i))
    assert bad == []


def test_no_import_cycle_in_run():
    run = {m for m in MODULES if m.startswith("widep.run.")}
    graph = {m: imports_of(m) & run for m in run}
    cycles: list[list[str]] = []

    def visit(m: str, path: list[str]) -> None:
        for n in sorted(graph[m]):
            if n in path:
                cycles.append(path[path.index(n) :] + [n])
            elif len(path) < len(run):
                visit(n, path + [n])

    for m in sorted(run):
        visit(m, [m])
    assert cycles == []


def calls_to(name: str, functions: set[str]) -> list[str]:
    out = []
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Call):
            f = node.func
            called = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None
            if called in functions:
                out.append(f"{name}:{node.lineno} {called}()")
    return out


def test_launch_commands_are_rendered_in_one_place():
    """Backends get the processes of a launch from widep.run.launch.render_launch; only `widep status` (not a
    launch) renders elsewhere in run/."""
    renders = {"render", "render_role", "render_router"}
    found = [c for m in MODULES if m.startswith("widep.run.") for c in calls_to(m, renders)]
    assert {c.split(":")[0] for c in found} <= {"widep.run.launch", "widep.run.cli"}
    assert [c for c in found if c.startswith("widep.run.cli")] == [
        c for c in calls_to("widep.run.cli", renders) if c.split(":")[1].split()[0] in status_lines()
    ]


def status_lines() -> set[str]:
    fn = next(n for n in ast.walk(TREES["widep.run.cli"]) if isinstance(n, ast.FunctionDef) and n.name == "status_cmd")
    return {str(i) for i in range(fn.lineno, (fn.end_lineno or fn.lineno) + 1)}


def test_no_argv_parsing_in_k8s_or_run():
    """Per-pod / per-node values come from ProcessCommand's fields and slots: nobody looks flags up in an argv."""
    bad = []
    for m in MODULES:
        if not m.startswith(("widep.k8s.", "widep.run.")) or m == "widep.run.guard":  # the guard reads its own argv
            continue
        for node in ast.walk(TREES[m]):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "index"
                and "argv" in ast.unparse(node.func.value)
            ):
                bad.append(f"{m}:{node.lineno} {ast.unparse(node)}")
            if (
                isinstance(node, ast.Compare)
                and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops)
                and any("argv" in ast.unparse(c) for c in node.comparators)
            ):
                bad.append(f"{m}:{node.lineno} {ast.unparse(node)}")
    assert bad == []


def room(module: str) -> str:
    """The room (top-level package or module under widep/) a module lives in: widep.plan.core -> plan."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "widep"


# What each room's modules may import (besides their own room), CLI modules aside: they wire rooms together.
# docs/architecture.md draws the same table; keep the two in step.
BASE = {"widep", "errors", "generated", "tinymoe"}
ROOMS = {
    "spec": BASE,
    "plan": BASE | {"spec"},
    "render": BASE | {"spec", "plan"},
    "k8s": BASE | {"spec", "plan", "render"},
    "bench": BASE | {"spec", "plan"},
    "doctor": BASE | {"spec", "plan"},
    "perf": BASE | {"spec", "plan", "bench", "run"},
}
# Known exceptions, each a single edge with its reason.
EXCEPTIONS = {
    ("widep.spec.topology", "widep.render.quoting"),  # POSIX env names and control characters, shared
    ("widep.render.vllm", "widep.vllm_gate"),  # --middleware's import path, kept beside the class it names
}


def test_each_room_imports_only_what_it_may():
    bad = sorted(
        f"{m} imports {i}"
        for m in MODULES
        if room(m) in ROOMS and not is_cli(m)
        for i in imports_of(m)
        if room(i) != room(m) and room(i) not in ROOMS[room(m)] and (m, i) not in EXCEPTIONS
    )
    assert bad == [], "a new edge between rooms: move the code, or widen ROOMS here and in docs/architecture.md"


def test_plan_imports_no_render_but_its_cli():
    """The planner is below the renderer: only ``widep plan``'s command module renders (function-level imports
    included); the extra_args ownership check lives in plan/extras.py."""
    bad = sorted(
        f"{m} imports {i}"
        for m in MODULES
        if room(m) == "plan" and m != "widep.plan.cli"
        for i in imports_of(m)
        if room(i) == "render"
    )
    assert bad == []


def test_planning_rules_are_plain():
    """plan/rules.py takes plain values: no pydantic, no topology schema; the sweep's fast path calls it."""
    names = {a.name for n in ast.walk(TREES["widep.plan.rules"]) if isinstance(n, ast.Import) for a in n.names} | {
        n.module or "" for n in ast.walk(TREES["widep.plan.rules"]) if isinstance(n, ast.ImportFrom)
    }
    assert not {n for n in names if n.startswith(("pydantic", "widep.spec.topology"))}
    assert "widep.plan.rules" in imports_of("widep.perf.enumerate")
    assert "widep.plan.rules" in imports_of("widep.plan.core")


def test_architecture_picture_is_generated_from_its_source():
    """docs/architecture.svg is what scripts/architecture_svg.py draws (run it after editing its table)."""
    import subprocess
    import sys

    script = PKG.parent / "scripts" / "architecture_svg.py"
    assert subprocess.run([sys.executable, str(script), "--check"], check=False).returncode == 0
    assert "architecture.svg" in (PKG.parent / "docs" / "architecture.md").read_text()
