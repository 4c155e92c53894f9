"""`render_report`: one self-contained HTML page about a build.

Manifest summary, verification table, latency and roofline charts (from
`infc bench`), op tables and fusion counts, and the picture of the optimized
network (from `infc profile`). Charts are drawn with matplotlib's Agg backend
and every image is embedded as a base64 data URI, so the file stands alone.
Sections whose inputs are missing say which command produces them.
"""

from __future__ import annotations

import base64
import html
import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .bench import load_bench
from .errors import UserError
from .manifest import load_manifest
from .profiling import load_profile

TOP_OPS = 12


@dataclass(frozen=True)
class ReportOptions:
    output: Path | None = None        # default: <build>/report.html
    bench_json: Path | None = None    # default: <build>/bench/bench.json
    profile_dir: Path | None = None   # default: <build>/profile


def _e(value) -> str:
    return html.escape(str(value))


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _figure_png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(figure)
    return _data_uri(buffer.getvalue(), "image/png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


# --- charts ------------------------------------------------------------------------------------

def latency_chart(bench: dict) -> str | None:
    """p50 latency per artifact, whiskers from min to p99."""
    rows = [r for r in bench["artifacts"] if r["status"] == "ok"]
    if not rows:
        return None
    plt = _pyplot()
    names = [r["name"] for r in rows]
    p50 = [r["latency_ms"]["p50"] for r in rows]
    low = [r["latency_ms"]["p50"] - r["latency_ms"]["min"] for r in rows]
    high = [r["latency_ms"]["p99"] - r["latency_ms"]["p50"] for r in rows]
    colors = ["#636363" if r["name"] == bench.get("baseline") else "#3182bd" for r in rows]
    figure, axis = plt.subplots(figsize=(8, 0.55 * len(rows) + 1.4))
    positions = list(range(len(rows)))[::-1]
    axis.barh(positions, p50, xerr=[low, high], color=colors, capsize=3, ecolor="#444444")
    axis.set_yticks(positions, names)
    axis.set_xlabel(f"latency per inference, ms (bar p50, whiskers min..p99; batch {bench['batch']})")
    for position, row in zip(positions, rows):
        speedup = row.get("speedup_vs_baseline")
        label = f" {row['latency_ms']['p50']:.1f} ms" + (f"  {speedup:.2f}x" if speedup else "")
        axis.text(row["latency_ms"]["p99"], position, label, va="center", fontsize=8)
    axis.set_xlim(0, max(r["latency_ms"]["p99"] for r in rows) * 1.35)
    axis.set_title(f"{bench['model']} on {bench['machine']['cpu']}")
    axis.grid(axis="x", alpha=0.3)
    return _figure_png(figure)


def roofline_chart(bench: dict) -> str | None:
    """Achieved GFLOP/s per artifact against the measured FP32 and INT8 GEMM ceilings."""
    ceilings = bench.get("ceilings") or {}
    rows = [r for r in bench["artifacts"] if r["status"] == "ok" and (r.get("roofline") or {}).get("achieved_gflops")]
    if not rows or "error" in ceilings or not ceilings:
        return None
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(8, 0.55 * len(rows) + 1.6))
    positions = list(range(len(rows)))[::-1]
    colors = {"fp32": "#3182bd", "int8": "#e6550d"}
    axis.barh(positions, [r["roofline"]["achieved_gflops"] for r in rows],
              color=[colors.get(r["roofline"].get("ceiling"), "#756bb1") for r in rows])
    axis.set_yticks(positions, [f"{r['name']} ({r['precision']})" for r in rows])
    for key, style in (("fp32", "-"), ("int8", "--")):
        if key in ceilings:
            axis.axvline(ceilings[key]["gflops"], color=colors[key], linestyle=style,
                         label=f"{key.upper()} GEMM ceiling {ceilings[key]['gflops']:.0f} G{'FLOP' if key == 'fp32' else 'OP'}/s")
    for position, row in zip(positions, rows):
        percent = row["roofline"].get("percent_of_ceiling")
        text = f" {row['roofline']['achieved_gflops']:.1f}" + (f" ({percent:.0f}% of {row['roofline']['ceiling']})"
                                                              if percent is not None else "")
        axis.text(row["roofline"]["achieved_gflops"], position, text, va="center", fontsize=8)
    axis.set_xlabel(f"achieved GFLOP/s = {bench['flops']['per_inference'] / 1e9:.2f} GFLOP / p50 latency")
    roofs = [ceilings[key]["gflops"] for key in ("fp32", "int8") if key in ceilings]
    axis.set_xlim(0, max(roofs + [r["roofline"]["achieved_gflops"] for r in rows]) * 1.1)
    axis.legend(loc="lower right", fontsize=8)
    axis.set_title("compute roofs: each artifact against the ceiling of its precision")
    axis.grid(axis="x", alpha=0.3)
    return _figure_png(figure)


# --- sections ----------------------------------------------------------------------------------

def _table(headers: list[str], rows: list[list], numeric: set[int] = frozenset()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for row in rows:
        cells = "".join(f"<td class='num'>{_e(c)}</td>" if i in numeric else f"<td>{c if isinstance(c, Markup) else _e(c)}</td>"
                        for i, c in enumerate(row))
        body.append(f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


class Markup(str):
    """Already-escaped HTML for a table cell."""


def _status(status: str) -> Markup:
    css = {"passed": "ok", "ok": "ok", "failed": "bad", "not run": "skip"}.get(status, "skip")
    return Markup(f"<span class='{css}'>{_e(status)}</span>")


def manifest_section(manifest: dict) -> str:
    model, target, weights = manifest["model"], manifest["target"], manifest["weights"]
    facts = [
        ("model", f"{model['name']} ({model['family']}, {model.get('zoo', '')})"),
        ("target", f"{target['name']}: {target.get('description', '')}"),
        ("status", manifest["status"]),
        ("built", f"{manifest.get('created', '?')} by infc {manifest.get('infc_version', '?')}"),
        ("inputs", ", ".join(f"{n} {'x'.join(map(str, i['shape']))} {i['dtype']}" for n, i in model["inputs"].items())),
        ("outputs", ", ".join(f"{n} {'x'.join(map(str, o['shape']))}" for n, o in model["outputs"].items())),
        ("weights", f"{weights['source']} sha256 {weights['sha256'][:16]}"
                    + ("  (random init: structure-only build, not for deployment)"
                       if weights["source"] == "random-init" else "")),
        ("tools", ", ".join(f"{k} {v}" for k, v in manifest.get("tools", {}).items() if v and k != "platform")),
    ]
    if manifest.get("engine"):
        engine = manifest["engine"]
        facts.append(("TensorRT engine", ", ".join(f"{k}: {v}" for k, v in engine.items())))
    facts_html = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in facts)
    artifacts = _table(["path", "kind", "format", "MB", "sha256"],
                       [[a["path"], a["kind"], a["format"], f"{a['bytes'] / 1e6:.2f}", a["sha256"][:12]]
                        for a in manifest["artifacts"]], numeric={3})
    stages = _table(["stage", "seconds", "summary"],
                    [[s["name"], f"{s['seconds']:.1f}", s.get("summary", "")] for s in manifest.get("stages", [])],
                    numeric={1})
    notes = "".join(f"<li>{_e(n)}</li>" for n in manifest.get("notes", []))
    return (f"<section id='manifest'><h2>Build</h2><table class='facts'>{facts_html}</table>"
            f"<h3>Artifacts</h3>{artifacts}<h3>Stages</h3>{stages}"
            + (f"<h3>Notes</h3><ul>{notes}</ul>" if notes else "") + "</section>")


def verification_section(manifest: dict) -> str:
    rows = [[c["artifact"], c["name"], _status(c["status"]), c.get("detail", ""), f"{c.get('seconds', 0):.2f}"]
            for c in manifest.get("verifications", [])]
    return (f"<section id='verification'><h2>Verification</h2>"
            f"{_table(['artifact', 'check', 'result', 'detail', 's'], rows, numeric={4})}</section>")


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def bench_section(bench: dict | None, bench_path: Path) -> str:
    if bench is None:
        return (f"<section id='bench'><h2>Latency</h2><p class='missing'>No bench results at {_e(bench_path)}: "
                f"run <code>infc bench BUILD_DIR</code>, then rerun <code>infc report</code>.</p></section>")
    machine = bench["machine"]
    ceilings = bench.get("ceilings") or {}
    intro = (f"<p>{_e(bench['created'])} on {_e(machine['cpu'])} ({machine['logical_cpus']} logical CPUs, "
             f"{_e(', '.join(machine.get('isa', [])))}); input {'x'.join(map(str, bench['input_shape']))}, "
             f"threads {_e(bench['options']['threads'])}, warm-up {bench['options']['warmup']}, "
             + (f"{bench['options']['iterations']} iterations" if bench['options'].get('iterations')
                else f"{bench['options']['duration']} s per artifact") + ". Baseline: MXNet imperative FP32, "
             "rebuilt from the build's weights and checked against its reference outputs.</p>")
    rows = []
    for r in bench["artifacts"]:
        if r["status"] != "ok":
            rows.append([r["name"], r["precision"], _status(r["status"]), r.get("reason", ""), *["-"] * 9])
            continue
        lat, roof, check = r["latency_ms"], r.get("roofline") or {}, r.get("output_check") or {}
        rows.append([r["name"], r["precision"], _status("ok"), check.get("status", "-"),
                     f"{r['phases']['load_s']:.2f}", f"{r['phases']['first_inference_s']:.2f}",
                     f"{lat['p50']:.2f}", f"{lat['p90']:.2f}", f"{lat['p99']:.2f}", f"{lat['min']:.2f}",
                     f"{r['memory']['peak_rss_mb']:.0f}", _fmt(r.get("speedup_vs_baseline"), ".2f"),
                     _fmt(roof.get("percent_of_ceiling"), ".1f")])
    table = _table(["artifact", "precision", "run", "output check", "load s", "first s", "p50 ms", "p90 ms", "p99 ms",
                    "min ms", "peak RSS MB", "speed-up", "% of ceiling"], rows, numeric=set(range(4, 13)))
    chart = latency_chart(bench)
    roof = roofline_chart(bench)
    flops = bench.get("flops")
    roof_text = ""
    if flops and ceilings and "error" not in ceilings:
        roof_text = (f"<p>Model: {flops['per_inference'] / 1e9:.2f} GFLOP per inference (2 x MACs of convolution, "
                     f"dense and matmul layers, counted from {_e(Path(flops['source']).name)}). Ceilings measured in "
                     f"the same run: FP32 {ceilings['fp32']['gflops']:.1f} GFLOP/s ({_e(ceilings['fp32']['method'])}), "
                     f"INT8 {ceilings['int8']['gflops']:.1f} GOP/s ({_e(ceilings['int8']['method'])})"
                     + (f"; best of {len(ceilings['runs'])} measurements (before and after the artifacts)"
                        if ceilings.get("runs") else "") + ".</p>")
    elif "error" in ceilings:
        roof_text = f"<p class='missing'>Ceilings not measured: {_e(ceilings['error'])}</p>"
    problems = "".join(f"<li class='bad'>{_e(p)}</li>" for p in bench.get("problems", []))
    problems += "".join(f"<li>{_e(w)}</li>" for w in bench.get("warnings", []))
    return ("<section id='bench'><h2>Latency</h2>" + intro
            + (f"<img alt='latency chart' src='{chart}'>" if chart else "") + table
            + (f"<ul>{problems}</ul>" if problems else "")
            + "<h2>Roofline</h2>" + roof_text + (f"<img alt='roofline chart' src='{roof}'>" if roof else
                                                 "<p class='missing'>No roofline numbers in the bench results.</p>")
            + "</section>")


def _picture(profile_root: Path, graph: dict) -> str | None:
    """The graph as SVG (sharp at any zoom), else PNG, as a data URI."""
    for key, mime in (("svg", "image/svg+xml"), ("png", "image/png")):
        path = profile_root / graph[key] if graph.get(key) else None
        if path is not None and path.is_file():
            return _data_uri(path.read_bytes(), mime)
    return None


def _fusion_table(fusion: dict) -> str:
    columns = [("portable", fusion.get("before")), ("artifact", fusion.get("after")),
               ("runtime-optimized", fusion.get("runtime_optimized"))]
    columns = [(label, data) for label, data in columns if data]
    if len(columns) > 1 and columns[1][0] == "artifact" and columns[1][1]["graph"] == columns[0][1]["graph"]:
        del columns[1]  # the artifact is the portable graph itself
    if not columns:
        return f"<p class='missing'>{_e(fusion.get('note', 'no fusion data'))}</p>"
    ops = []
    for _, data in columns:
        ops.extend(op for op in data["ops"] if op not in ops)
    rows = [[op, *[str(data["ops"].get(op, "")) for _, data in columns]] for op in ops]
    rows.append([Markup("<b>nodes</b>"), *[str(data["nodes"]) for _, data in columns]])
    patterns = {}
    for _, data in columns:
        patterns.update(data.get("fused_patterns", {}))
    pattern_text = ("<p>Fused patterns: " + "; ".join(f"{_e(p)} x{n}" for p, n in patterns.items()) + "</p>"
                    if patterns else "")
    return _table(["op", *[f"{label} ({Path(data['graph']).name})" for label, data in columns]], rows,
                  numeric=set(range(1, len(columns) + 1))) + pattern_text


def profile_section(profile: dict | None, profile_root: Path) -> str:
    if profile is None:
        return (f"<section id='profile'><h2>Where the time goes</h2><p class='missing'>No profile at "
                f"{_e(profile_root)}: run <code>infc profile BUILD_DIR</code>, then rerun "
                f"<code>infc report</code>.</p></section>")
    parts = ["<section id='profile'><h2>Where the time goes</h2>"
             "<p>Per-op time from each runtime's own profiler (MXNet profiler with op bulking off; "
             "ONNX Runtime session profiling), averaged over the profiled inferences.</p>"]
    pictures = []
    for entry in profile["artifacts"]:
        if entry["status"] != "ok":
            parts.append(f"<h3>{_e(entry['name'])}</h3><p class='missing'>{_e(entry['status'])}: "
                         f"{_e(entry.get('reason', ''))}</p>")
            continue
        rows = [[r["op"], f"{100 * r['share']:.1f}%", f"{r['ms_per_inference']:.3f}", f"{r['calls_per_inference']:.0f}"]
                for r in entry["op_table"][:TOP_OPS]]
        more = len(entry["op_table"]) - TOP_OPS
        parts.append(f"<h3>{_e(entry['name'])} <small>({_e(entry['runtime'])}, "
                     f"{entry['profiled_ms_per_inference']:.2f} ms of op time per inference)</small></h3>"
                     + _table(["op type", "share", "ms / inference", "calls / inference"], rows, numeric={1, 2, 3})
                     + (f"<p>... and {more} more op types in {_e(entry['name'])}/op_table.txt</p>" if more > 0 else "")
                     + "<h4>Fusion: op counts</h4>" + _fusion_table(entry["fusion"]))
        picture = _picture(profile_root, entry["graph"])
        if picture:
            pictures.append((entry, picture))
        elif entry["graph"].get("note"):
            parts.append(f"<p class='missing'>{_e(entry['graph']['note'])}</p>")
    parts.append("<h2>The optimized network</h2>")
    if not pictures:
        parts.append("<p class='missing'>No graph picture in the profile (Graphviz's dot missing?).</p>")
    # The most transformed graph first: it is the one the runtime actually executes.
    pictures.sort(key=lambda item: (item[0]["fusion"].get("node_reduction") or 0), reverse=True)
    for number, (entry, picture) in enumerate(pictures):
        reduction = entry["fusion"].get("node_reduction")
        parts.append(f"<details{' open' if number == 0 else ''}><summary>{_e(entry['name'])}"
                     + (f": {100 * reduction:.0f}% fewer ops than portable" if reduction else "")
                     + f"</summary><div class='graph'><img alt='graph of {_e(entry['name'])}' src='{picture}'></div>"
                     "</details>")
    parts.append("</section>")
    return "".join(parts)


STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px;
       color: #222; padding: 0 1em; }
h1 { border-bottom: 3px solid #3182bd; padding-bottom: .2em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: .6em 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 7px; text-align: left; vertical-align: top; }
thead th { background: #f0f4f8; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.facts th { background: #f7f7f7; width: 9em; }
.ok { color: #2a7d2a; font-weight: bold; } .bad { color: #c0392b; font-weight: bold; } .skip { color: #888; }
.missing { color: #8a6d3b; background: #fcf8e3; padding: .4em .7em; }
.warning { background: #fdecea; color: #8a1f11; padding: .5em .8em; border-left: 4px solid #c0392b; }
img { max-width: 100%; }
div.graph { max-height: 900px; overflow: auto; border: 1px solid #ddd; }
div.graph img { max-width: none; }
code { background: #f4f4f4; padding: 0 .3em; }
"""


def render_report(build_dir: Path, options: ReportOptions = ReportOptions()) -> Path:
    """Write the build's HTML report and return its path."""
    build_dir = Path(build_dir)
    manifest = load_manifest(build_dir)
    bench_path = Path(options.bench_json) if options.bench_json else build_dir / "bench" / "bench.json"
    if options.bench_json is not None:
        bench = load_bench(bench_path)  # asked for by name: it must be there
    else:
        bench = load_bench(bench_path) if bench_path.exists() else None
    if bench is not None and bench.get("model") != manifest["model"]["name"]:
        raise UserError(f"{bench_path} measured {bench.get('model')}, but {build_dir} is {manifest['model']['name']}",
                        "pass the bench results of this build with --bench")
    profile_root = Path(options.profile_dir) if options.profile_dir else build_dir / "profile"
    if options.profile_dir is not None and not (profile_root / "profile.json").is_file():
        raise UserError(f"{profile_root} has no profile.json", "run `infc profile BUILD_DIR --out-dir DIR` first")
    profile = load_profile(profile_root)

    model = manifest["model"]["name"]
    target = manifest["target"]["name"]
    warning = ("<p class='warning'>Random-init weights: a structure-only build. Latencies are real; "
               "outputs are not meaningful predictions.</p>" if manifest["weights"]["source"] == "random-init" else "")
    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
            f"<title>infc report: {_e(model)} for {_e(target)}</title><style>{STYLE}</style></head><body>"
            f"<h1>{_e(model)} <small>for {_e(target)}</small></h1>{warning}"
            + manifest_section(manifest) + verification_section(manifest)
            + bench_section(bench, bench_path) + profile_section(profile, profile_root)
            + f"<footer><p><small>infc report of {_e(build_dir)}</small></p></footer></body></html>\n")
    out = Path(options.output) if options.output else build_dir / "report.html"
    try:
        write_text_atomic(out, page)
    except OSError as exc:
        raise UserError(f"cannot write the report to {out}: {exc.strerror or exc}", "pass a writable -o FILE") from None
    return out


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = ["ReportOptions", "render_report", "latency_chart", "roofline_chart"]
