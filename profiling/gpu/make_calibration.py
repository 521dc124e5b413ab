"""Turn the microbenchmark result files of one machine into one calibration file for the analytic model.

    python profiling/gpu/make_calibration.py --results profiling/results            # every card found
    python profiling/gpu/make_calibration.py --results DIR --card h100 --gpus 4 --out x.json

Inputs (in --results; written by the scripts beside this one): ``a2a-<card>x<N>.json``,
``gemm-<card>x1.json``, ``hbm-<card>x1.json``, ``moe-layer-<card>x<n>.json`` (any n <= N). For each card the
machine's GPU count N is the largest in those names. Output: ``calibration-<card>x<N>.json``. Pure standard
library; no torch needed.

Format ``widep-calibration/1`` (times in microseconds, bandwidths in GB/s = 1e9 B/s, lists aligned index by
index with their ``tokens`` / ``tokens_per_expert`` list):

{
  "format": "widep-calibration/1",
  "card": "h100", "device_name": "NVIDIA H100 80GB HBM3", "gpus": 4,
  "software": {"torch": ..., "cuda": ..., "nccl": ...}, "dates": {"a2a": ISO date, ...},
  "sources": {"a2a": "a2a-h100x4.json", "gemm": ..., "hbm": ..., "moe_layer": [...]},
  "hbm_gbps_effective": 3000.0,        # large streaming read (torch.sum); the rate weights and KV stream at
  "hbm": {"copy_gbps": .., "read_gbps": ..,                      # copy counts read + write
          "paged_kv_read_gbps": {"bf16_576": {"64": {"bytes": [..], "gbps": [..]}, "1": {...}},
                                 "fp8_656": {...}}},               # by row format, then block size
  "matmul_peak_tflops": {"bf16": .., "fp8": ..},                   # dense 8192^3
  "gemm": {
    "bf16": {"impl": "bf16_grouped_mm", "ref_experts": 16,
             "tflops_at_tokens": {"1": .., ..., "4096": ..},       # fc1+fc2 together at ref_experts experts
             "fc1": {"n": 4096, "k": 7168,
                     "experts": {"8": {"tokens_per_expert": [..], "us": [..], "tflops": [..], "hbm_gbps": [..]},
                                 ...}},
             "fc2": {...}},
    "fp8": {same keys; impl is the preferred FP8 variant that ran and passed its check},
    "variants": {"<variant>": {"ok": bool, "error": str|null, "check": {...}, "fc1": ..., "fc2": ...}}},
  "a2a": {"nccl": {"dispatch_bytes_per_row": 7392, "combine_bytes_per_row": 14336,
                   "ep": {"2": {"counts_us": ..,
                                "expert": {"tokens": [..], "dispatch_us": [..], "combine_us": [..],
                                           "dispatch_p90_us": [..], "combine_p90_us": [..],
                                           "dispatch_gbps_per_rank": [..], "combine_gbps_per_rank": [..]},
                                "rank": {...}}}},                  # expert: a copy per (token, expert)
          "deep_ep": {"importable": false, "error": ...}},         # rank: a copy per (token, rank)
  "moe_layer": {"ep": {"4": {"tokens": [..], "total_us": [..], "total_p90_us": [..],
                             "phases_us": {"route": [..], "layout": [..], "dispatch": [..], "regroup": [..],
                                           "experts": [..], "combine": [..], "reduce": [..]},
                             "gemm": "grouped", "dispatch": "fp8", "check_ok": true}}},
  "model_check": [{"ep": 4, "tokens": 128, "measured_us": .., "predicted_us": .., "error_pct": ..,
                   "terms_us": {"layout": .., "dispatch": .., "experts": .., "combine": ..},
                   "measured_terms_us": {...}, "overhead_fit_on_ep": [2],
                   "predicted_with_overhead_us": .., "error_with_overhead_pct": ..}],
  "moe_layer_overhead_fit": {"2": {"a_us": .., "b_us_per_token": .., "points": 6}, "4": {...}}
}

In files made by a ``--cpu-smoke`` run (tests) the a2a backend key is "gloo" instead of "nccl".

The layer model behind ``model_check`` (``predict_layer_us``), for EP size ep, T tokens per rank, top-k of
E experts, L = E/ep local experts:
  layout   = a2a counts_us(ep)
  dispatch = a2a expert-mode dispatch_us(ep, T)       (interpolated linearly in log2 T)
  combine  = a2a expert-mode combine_us(ep, T)
  experts  = a * (t_fc1(m) + t_fc2(m)) / E_ref        with P = 1 - (1 - k/E)^(T*ep) the chance that an expert
             gets a row, a = L*P active experts, m = T*k*ep/E / P rows each, t(m) the measured grouped GEMM
             time of E_ref experts (E_ref the measured expert count nearest L) interpolated log-log in m
  predicted = layout + dispatch + experts + combine.
Routing, quantization, regrouping and the final weighted sum are not modelled: the gap between
predicted_us and measured_us is what they (and rank skew, host syncs and launch gaps) cost.

That gap is then modelled as a framework overhead a + b*T (least squares per EP size, stored as
``moe_layer_overhead_fit``). Each model_check row with layer data at another EP size also gets
``predicted_with_overhead_us`` / ``error_with_overhead_pct``: the overhead fitted on the *other* EP sizes
only (leave-one-EP-out), so the row is a prediction and not a fit of itself.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

FORMAT = "widep-calibration/1"
FILE_RE = re.compile(r"^(a2a|gemm|hbm|moe-layer)-([a-z0-9-]+?)x(\d+)\.json$")
BF16_PREFERENCE = ["bf16_grouped_mm", "bf16_bmm"]
FP8_PREFERENCE = ["fp8_grouped_rowwise", "fp8_block_loop", "fp8_rowwise_loop"]


class CalibrationError(Exception):
    """A result file is missing or malformed; the message says which and what was expected."""


def _load(path: Path) -> dict:
    try:
        doc = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CalibrationError(f"cannot read {path}: {e}") from e
    if not isinstance(doc, dict) or "meta" not in doc or "kind" not in doc:
        raise CalibrationError(f"{path}: not a microbenchmark result (no 'kind'/'meta')")
    return doc


def find_files(results: Path) -> dict[str, dict[str, list[tuple[int, Path]]]]:
    """card -> kind -> [(gpu count, path)]"""
    out: dict[str, dict[str, list[tuple[int, Path]]]] = {}
    for p in sorted(results.glob("*.json")):
        m = FILE_RE.match(p.name)
        if m:
            kind, card, n = m.group(1), m.group(2), int(m.group(3))
            out.setdefault(card, {}).setdefault(kind, []).append((n, p))
    return out


def interp(xs: list[float], ys: list[float], x: float, *, logy: bool = False) -> float:
    """Piecewise-linear in log2(x) (and log(y) if logy); clamped to the ends."""
    if not xs:
        raise CalibrationError("interpolation over an empty table")
    pts = sorted(zip(xs, ys, strict=False))
    lx = math.log2(max(x, 1e-9))
    if lx <= math.log2(pts[0][0]):
        return pts[0][1]
    if lx >= math.log2(pts[-1][0]):
        return pts[-1][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        l0, l1 = math.log2(x0), math.log2(x1)
        if l0 <= lx <= l1:
            f = 0.0 if l1 == l0 else (lx - l0) / (l1 - l0)
            if logy and y0 > 0 and y1 > 0:
                return math.exp(math.log(y0) + f * (math.log(y1) - math.log(y0)))
            return y0 + f * (y1 - y0)
    return pts[-1][1]


# --- sections -------------------------------------------------------------------------------------------
def hbm_section(doc: dict) -> tuple[float, dict]:
    r = doc["results"]
    paged: dict = {}
    for pt in r.get("paged_read", []):
        if "gbps" not in pt or pt.get("layout") != "random" or not pt.get("check_ok", False):
            continue
        d = paged.setdefault(pt["row"], {}).setdefault(
            str(pt["block_size"]), {"bytes": [], "gbps": [], "seqs": [], "tokens": []}
        )
        d["bytes"].append(pt["bytes"])
        d["gbps"].append(pt["gbps"])
        d["seqs"].append(pt["seqs"])
        d["tokens"].append(pt["tokens"])
    seq = [pt["gbps"] for pt in r.get("paged_read", []) if pt.get("layout") == "sequential" and "gbps" in pt]
    sec = {
        "copy_gbps": r["copy"]["gbps"],
        "read_gbps": r["read"]["gbps"],
        "paged_kv_read_gbps": paged,
        "paged_kernel_sequential_gbps": max(seq) if seq else None,
        "torch_gather_rw_gbps": {
            f"{g['row']}/bs{g['block_size']}/{g['seqs']}x{g['tokens']}": g["gbps"]
            for g in r.get("paged_gather_torch", [])
        },
    }
    return r["read"]["gbps"], sec


def gemm_tables(var: dict) -> dict:
    """variant -> {gemm: {"n","k","experts": {E: {...lists...}}}}"""
    out: dict = {}
    for pt in var["points"]:
        if "tflops" not in pt:
            continue
        g = out.setdefault(pt["gemm"], {"n": pt["n"], "k": pt["k"], "experts": {}})
        e = g["experts"].setdefault(
            str(pt["experts"]), {"tokens_per_expert": [], "us": [], "tflops": [], "hbm_gbps": []}
        )
        e["tokens_per_expert"].append(pt["tokens_per_expert"])
        e["us"].append(pt["time"]["median_us"])
        e["tflops"].append(pt["tflops"])
        e["hbm_gbps"].append(pt["hbm_gbps"])
    return out


def _ref_experts(tables: dict) -> int | None:
    """Largest expert count measured at every tokens-per-expert point of every GEMM."""
    best = None
    all_m = None
    for g in tables.values():
        ms = set()
        for e in g["experts"].values():
            ms |= set(e["tokens_per_expert"])
        all_m = ms if all_m is None else all_m & ms
    for g in tables.values():
        for e, d in g["experts"].items():
            if all_m and set(d["tokens_per_expert"]) >= all_m:
                if all(
                    e in gg["experts"] and set(gg["experts"][e]["tokens_per_expert"]) >= all_m for gg in tables.values()
                ):
                    best = max(best or 0, int(e))
    return best


def summarize_variant(name: str, var: dict) -> dict:
    tables = gemm_tables(var)
    ok = var.get("available", False) and bool(var.get("check")) and all(c.get("ok") for c in var["check"].values())
    sec = {"impl": name, "ok": ok, "error": var.get("error"), "check": var.get("check"), **tables}
    ref = _ref_experts(tables) if tables else None
    sec["ref_experts"] = ref
    if ref is not None:
        at: dict = {}
        ms = tables[next(iter(tables))]["experts"][str(ref)]["tokens_per_expert"]
        for m in sorted(ms):
            flops = us = 0.0
            for g in tables.values():
                d = g["experts"][str(ref)]
                i = d["tokens_per_expert"].index(m)
                us += d["us"][i]
                flops += 2.0 * ref * m * g["n"] * g["k"]
            at[str(m)] = flops / us / 1e6
        sec["tflops_at_tokens"] = at
    return sec


def gemm_section(doc: dict) -> tuple[dict, dict]:
    variants = {name: summarize_variant(name, v) for name, v in doc["variants"].items()}
    sec: dict = {"variants": variants}
    for key, pref in (("bf16", BF16_PREFERENCE), ("fp8", FP8_PREFERENCE)):
        for name in pref:
            v = variants.get(name)
            if v and v["ok"] and v.get("ref_experts"):
                sec[key] = v
                break
    peak = {}
    dp = doc.get("dense_peak", {})
    if "tflops" in dp.get("bf16", {}):
        peak["bf16"] = dp["bf16"]["tflops"]
    if "tflops" in dp.get("fp8_rowwise", {}):
        peak["fp8"] = dp["fp8_rowwise"]["tflops"]
    return sec, peak


def a2a_section(doc: dict) -> dict:
    backends = doc["backends"]
    out: dict = {}
    for bname, b in backends.items():
        if bname == "deep_ep":
            out["deep_ep"] = b
            continue
        eps: dict = {}
        for ep, res in b["ep"].items():
            e: dict = {"counts_us": res["counts"]["median_us"]}
            for mode in ("expert", "rank"):
                if mode not in res:
                    continue
                rows = res[mode]
                e[mode] = {
                    "tokens": [r["tokens"] for r in rows],
                    "dispatch_us": [r["dispatch"]["median_us"] for r in rows],
                    "combine_us": [r["combine"]["median_us"] for r in rows],
                    "dispatch_p90_us": [r["dispatch"]["p90_us"] for r in rows],
                    "combine_p90_us": [r["combine"]["p90_us"] for r in rows],
                    "dispatch_gbps_per_rank": [r["dispatch_gbps_per_rank"] for r in rows],
                    "combine_gbps_per_rank": [r["combine_gbps_per_rank"] for r in rows],
                    "rows_per_rank": [r["rows_per_rank"] for r in rows],
                }
            eps[ep] = e
        out[bname] = {
            "dispatch_bytes_per_row": doc["config"]["dispatch_bytes_per_row"],
            "combine_bytes_per_row": doc["config"]["combine_bytes_per_row"],
            "ep": eps,
        }
    return out


def moe_section(docs: list[dict]) -> dict:
    eps: dict = {}
    for doc in docs:
        c = doc["config"]
        rows = doc["results"]
        eps[str(c["ep"])] = {
            "tokens": [r["tokens"] for r in rows],
            "total_us": [r["total"]["median_us"] for r in rows],
            "total_p90_us": [r["total"]["p90_us"] for r in rows],
            "phases_us": {ph: [r["phases"][ph]["median_us"] for r in rows] for ph in c["phases"]},
            "gemm": c["gemm"],
            "dispatch": c["dispatch"],
            "experts": c["experts"],
            "topk": c["topk"],
            "hidden": c["hidden"],
            "inter": c["inter"],
            "check_ok": (doc.get("check") or {}).get("ok"),
            "source": doc.get("_source"),
        }
    return {"ep": eps}


# --- the layer model -----------------------------------------------------------------------------------
def gemm_us(variant: dict, gemm: str, experts_local: float, m: float) -> tuple[float, int]:
    """Time of ``experts_local`` experts at ``m`` rows each, from the measured E nearest ``experts_local``."""
    table = variant[gemm]["experts"]
    es = sorted(int(e) for e in table)
    e_ref = min(es, key=lambda e: (abs(math.log2(e) - math.log2(max(experts_local, 1e-9))), -e))
    d = table[str(e_ref)]
    t = interp(d["tokens_per_expert"], d["us"], max(m, 1.0), logy=True)
    return t * experts_local / e_ref, e_ref


def a2a_backend(cal: dict) -> dict | None:
    """The collective backend's a2a table: 'nccl' on GPUs ('gloo' in CPU smoke runs)."""
    a2a = cal.get("a2a", {})
    for name in ("nccl", "gloo"):
        if name in a2a:
            return a2a[name]
    return None


def predict_layer_us(
    cal: dict, ep: int, tokens: int, *, experts: int = 256, topk: int = 8, gemm_impl: str | None = None
) -> dict:
    a2a = a2a_backend(cal)["ep"][str(ep)]
    ex = a2a["expert"]
    disp = interp(ex["tokens"], ex["dispatch_us"], tokens, logy=True)
    comb = interp(ex["tokens"], ex["combine_us"], tokens, logy=True)
    local = experts / ep
    p_active = 1.0 - (1.0 - topk / experts) ** (tokens * ep)
    active = local * p_active
    m = tokens * topk * ep / experts / p_active
    variant = cal["gemm"]["variants"].get(gemm_impl) if gemm_impl else None
    if not variant or not variant.get("ok"):
        variant = cal["gemm"]["bf16"]
    t1, e_ref = gemm_us(variant, "fc1", active, m)
    t2, _ = gemm_us(variant, "fc2", active, m)
    terms = {"layout": a2a["counts_us"], "dispatch": disp, "experts": t1 + t2, "combine": comb}
    return {
        "predicted_us": sum(terms.values()),
        "terms_us": terms,
        "gemm_impl": variant["impl"],
        "gemm_ref_experts": e_ref,
        "active_experts": active,
        "rows_per_active_expert": m,
    }


def fit_overhead(rows: list[dict]) -> dict | None:
    """Least-squares overhead(T) = a + b*T of (measured - predicted) over ``rows``; None if under 2 points."""
    pts = [(r["tokens"], r["measured_us"] - r["predicted_us"]) for r in rows]
    if len(pts) < 2:
        return None
    n = len(pts)
    mx = sum(x for x, _ in pts) / n
    my = sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    b = 0.0 if sxx == 0 else sum((x - mx) * (y - my) for x, y in pts) / sxx
    return {"a_us": my - b * mx, "b_us_per_token": b, "points": n}


def add_overhead(rows: list[dict]) -> dict:
    """Fit the layer's unmodelled cost per EP size; predict each EP size from the fit on the others."""
    fits = {}
    for ep in sorted({r["ep"] for r in rows}):
        f = fit_overhead([r for r in rows if r["ep"] == ep])
        if f:
            fits[str(ep)] = f
    for r in rows:
        others = [r2 for r2 in rows if r2["ep"] != r["ep"]]
        f = fit_overhead(others)
        if f is None:
            continue
        over = f["a_us"] + f["b_us_per_token"] * r["tokens"]
        r["overhead_fit_on_ep"] = sorted({r2["ep"] for r2 in others})
        r["predicted_with_overhead_us"] = r["predicted_us"] + over
        r["error_with_overhead_pct"] = 100.0 * (r["predicted_with_overhead_us"] - r["measured_us"]) / r["measured_us"]
    return fits


def model_check(cal: dict) -> list[dict]:
    out = []
    backend = a2a_backend(cal)
    if backend is None or "bf16" not in cal.get("gemm", {}):
        return out
    for ep, layer in sorted(cal.get("moe_layer", {}).get("ep", {}).items(), key=lambda kv: int(kv[0])):
        if ep not in backend["ep"]:
            continue
        impl = {"grouped": "bf16_grouped_mm", "loop": "bf16_bmm"}.get(layer["gemm"], None)
        for i, t in enumerate(layer["tokens"]):
            pred = predict_layer_us(cal, int(ep), t, experts=layer["experts"], topk=layer["topk"], gemm_impl=impl)
            meas = layer["total_us"][i]
            ph = {k: v[i] for k, v in layer["phases_us"].items()}
            out.append(
                {
                    "ep": int(ep),
                    "tokens": t,
                    "measured_us": meas,
                    "predicted_us": pred["predicted_us"],
                    "error_pct": 100.0 * (pred["predicted_us"] - meas) / meas,
                    "terms_us": pred["terms_us"],
                    "measured_terms_us": {
                        "layout": ph.get("layout"),
                        "dispatch": ph.get("dispatch"),
                        "experts": ph.get("experts"),
                        "combine": ph.get("combine"),
                        "unmodelled": sum(ph.get(k, 0.0) for k in ("route", "regroup", "reduce")),
                    },
                    "gemm_impl": pred["gemm_impl"],
                    "active_experts": pred["active_experts"],
                    "rows_per_active_expert": pred["rows_per_active_expert"],
                }
            )
    return out


def build_calibration(results: Path, card: str, gpus: int | None = None) -> dict:
    files = find_files(results).get(card)
    if not files:
        raise CalibrationError(f"no result files for card {card!r} in {results}")
    n_max = max(n for lst in files.values() for n, _ in lst)
    gpus = gpus or n_max
    cal: dict = {"format": FORMAT, "card": card, "gpus": gpus, "sources": {}, "dates": {}, "software": {}}

    def pick(kind: str, n: int | None = None) -> tuple[Path, dict] | None:
        cands = [(k, p) for k, p in files.get(kind, []) if (n is None or k == n)]
        if not cands:
            return None
        k, p = max(cands)
        return p, _load(p)

    def note(kind: str, p: Path, doc: dict) -> None:
        cal["sources"][kind] = p.name
        cal["dates"][kind] = doc["meta"].get("date")
        cal.setdefault("device_name", doc["meta"].get("device_name"))
        for key in ("torch", "cuda", "nccl"):
            if doc["meta"].get(key) and not cal["software"].get(key):
                cal["software"][key] = doc["meta"][key]

    got = pick("hbm")
    if got:
        note("hbm", *got)
        cal["hbm_gbps_effective"], cal["hbm"] = hbm_section(got[1])
    got = pick("gemm")
    if got:
        note("gemm", *got)
        cal["gemm"], cal["matmul_peak_tflops"] = gemm_section(got[1])
    got = pick("a2a", gpus)
    if got:
        note("a2a", *got)
        cal["a2a"] = a2a_section(got[1])
    moe_docs = []
    for n, p in sorted(files.get("moe-layer", [])):
        if n <= gpus:
            d = _load(p)
            d["_source"] = p.name
            moe_docs.append(d)
            cal["dates"].setdefault("moe_layer", d["meta"].get("date"))
    if moe_docs:
        cal["sources"]["moe_layer"] = [d["_source"] for d in moe_docs]
        cal["moe_layer"] = moe_section(moe_docs)
    cal["model_check"] = model_check(cal)
    if cal["model_check"]:
        cal["moe_layer_overhead_fit"] = add_overhead(cal["model_check"])
    return cal


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", default="profiling/results")
    p.add_argument("--card", default=None, help="e.g. h100; default every card with result files")
    p.add_argument("--gpus", type=int, default=None, help="machine GPU count; default the largest in the names")
    p.add_argument(
        "--out", default=None, help="output file (one card only); default <results>/calibration-<card>x<N>.json"
    )
    args = p.parse_args(argv)
    results = Path(args.results)
    cards = [args.card] if args.card else sorted(find_files(results))
    if not cards:
        print(
            f"--results: Given: {results}. Valid: a folder holding a2a-/gemm-/hbm-/moe-layer-<card>x<N>.json",
            file=sys.stderr,
        )
        return 2
    if args.out and len(cards) > 1:
        print(f"--out: Given: one file for cards {cards}. Valid: pass --card too", file=sys.stderr)
        return 2
    for card in cards:
        try:
            cal = build_calibration(results, card, args.gpus)
        except CalibrationError as e:
            print(f"make_calibration: {e}", file=sys.stderr)
            return 2
        out = Path(args.out) if args.out else results / f"calibration-{card}x{cal['gpus']}.json"
        out.write_text(json.dumps(cal, indent=1) + "\n")
        print(f"wrote {out}")
        for row in cal["model_check"]:
            extra = ""
            if "predicted_with_overhead_us" in row:
                extra = (
                    f"; with overhead fitted on EP{row['overhead_fit_on_ep']}: "
                    f"{row['predicted_with_overhead_us']:.0f} us ({row['error_with_overhead_pct']:+.0f}%)"
                )
            print(
                f"  EP{row['ep']} T={row['tokens']}: measured {row['measured_us']:.0f} us, "
                f"predicted {row['predicted_us']:.0f} us ({row['error_pct']:+.0f}%){extra}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
