"""How fast `widep lws --validate` is on many documents and on one oversized document, against a baseline.

Three inputs, built in a temporary folder:

* ``checked-in``: every manifest in lws/ (the 22 documents widep generates for the curated topologies);
* ``many``: the small ones (Services) repeated to ``--docs`` documents (the issue's probe had 10,120);
* ``huge``: one ConfigMap of ``--huge-mib`` MiB (over the API server's 1.5 MiB object limit).

Each input is validated in-process with ``widep.k8s.validate.validate_text`` (warm: the CRD and core
schemas are loaded first; results memoised by an earlier run are dropped), ``--runs`` times; the median is
reported, and the peak of Python allocations of one more run. With ``--baseline-src DIR`` (a checkout of
another commit, e.g. ``git archive bbccae5 | tar -x -C DIR``) the same measurements run in a subprocess
importing widep from DIR, and the ratio baseline / this tree is printed. Results: JSON on stdout or ``--out``.

    cd profiling && python lws_validate_speed.py --baseline-src /tmp/widep-base --out results/lws-validate-speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def corpora(folder: Path, docs: int, huge_mib: float) -> dict[str, Path]:
    texts = [p.read_text() for p in sorted((ROOT / "lws").glob("*.yaml"))]
    pieces = [d for t in texts for d in t.split("\n---\n")]
    out = {"checked-in": folder / "checked-in.yaml", "many": folder / "many.yaml", "huge": folder / "huge.yaml"}
    out["checked-in"].write_text("\n---\n".join(pieces))
    small = [d for d in pieces if "kind: Service" in d]  # the small documents (a few hundred bytes each)
    rep = (docs + len(small) - 1) // len(small)
    out["many"].write_text("\n---\n".join((small * rep)[:docs]))
    line = "x" * 100
    lines = int(huge_mib * 2**20 / 120)
    data = "\n".join(f"  k{i}: {line}" for i in range(lines))
    out["huge"].write_text(f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: huge\ndata:\n{data}\n")
    return out


def measure(paths: dict[str, str], runs: int, huge_runs: int) -> dict[str, dict[str, object]]:
    import widep
    from widep.k8s import validate as v

    crd = v.default_crd_path()
    v.validate_text(Path(paths["checked-in"]).read_text(), crd)  # warm: schemas loaded
    res: dict[str, dict[str, object]] = {}
    for name, path in paths.items():
        text = Path(path).read_text()
        times = []
        for _ in range(huge_runs if name == "huge" else runs):
            getattr(v, "_SCHEMA_MEMO", {}).clear()  # schemas warm, no results remembered from an earlier run
            t0 = time.perf_counter()
            count, problems = v.validate_text(text, crd)
            times.append(time.perf_counter() - t0)
        tracemalloc.start()  # one more run for the peak of Python allocations (slow: not timed)
        v.validate_text(text, crd)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        res[name] = {
            "median_s": statistics.median(times),
            "runs": len(times),
            "documents": count,
            "problems": len(problems),
            "bytes": len(text),
            "peak_mib": round(peak / 2**20, 1),
        }
    res["source"] = {"widep": str(Path(widep.__file__).parent)}  # which tree was measured
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--huge-mib", type=float, default=4.0)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--huge-runs", type=int, default=3)
    ap.add_argument("--baseline-src", default=None, help="a source tree of widep to compare against")
    ap.add_argument("--out", default=None)
    ap.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # child mode: JSON of corpus paths
    ns = ap.parse_args()
    if ns.measure:
        print(json.dumps(measure(json.loads(ns.measure), ns.runs, ns.huge_runs)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        paths = {k: str(p) for k, p in corpora(Path(tmp), ns.docs, ns.huge_mib).items()}
        this = measure(paths, ns.runs, ns.huge_runs)
        result: dict[str, object] = {"docs": ns.docs, "huge_mib": ns.huge_mib, "runs": ns.runs, "this": this}
        if ns.baseline_src:
            env = {**os.environ, "PYTHONPATH": ns.baseline_src}
            cmd = [
                sys.executable,
                __file__,
                "--measure",
                json.dumps(paths),
                "--runs",
                str(ns.runs),
                "--huge-runs",
                str(min(ns.huge_runs, 1)),
            ]
            base = json.loads(
                subprocess.run(cmd, env=env, check=True, capture_output=True, text=True, cwd=ns.baseline_src).stdout
            )
            result["baseline"] = base
            result["speedup"] = {k: round(base[k]["median_s"] / this[k]["median_s"], 2) for k in base if k != "source"}
    text = json.dumps(result, indent=2)
    if ns.out:
        Path(ns.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
