"""`profile_build`: where each artifact's time goes, what fusion did, and a picture of the graph.

Per artifact, under `<build>/profile/<artifact>/`:
- trace.json: the runtime's own profile in chrome://tracing form ({"traceEvents": [...]}):
  the MXNet profiler for MXNet artifacts, ONNX Runtime's profiler for ONNX ones;
- op_table.json / op_table.txt: time per op type, per inference, with its share and call count;
- fusion.json: op counts of the portable graph against the fused / quantized / runtime-optimized one;
- graph.dot, graph.svg, graph.png: the network as the runtime executes it (Graphviz).

MXNet is profiled with op bulking off (MXNET_EXEC_BULK_EXEC_INFERENCE=0): bulked
segments show up as one event for a dozen ops, which no op table can split.
"""

from __future__ import annotations

import collections
import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .bench import BenchArtifact, WorkerFailed, discover_artifacts, run_worker, select_artifacts
from .errors import UserError, VerificationFailed
from .manifest import check_artifact_hashes, load_manifest, write_json_atomic

PROFILE_SCHEMA = 1
PROFILED_RUNTIMES = ("mxnet-imperative", "mxnet", "onnxruntime")
GRAPH_RENDER_TIMEOUT_S = 300


@dataclass(frozen=True)
class ProfileOptions:
    artifacts: tuple[str, ...] = ()   # default: every artifact that runs on this CPU
    warmup: int = 1
    iterations: int = 3
    graph: bool = True
    out_dir: Path | None = None       # default: <build>/profile

    def validated(self) -> "ProfileOptions":
        if self.iterations < 1:
            raise UserError(f"--iterations {self.iterations} is less than 1", "pass 1 or more")
        if self.warmup < 0:
            raise UserError(f"--warmup {self.warmup} is negative", "pass 0 or more")
        return self


@dataclass
class ProfileResult:
    out_dir: Path
    data: dict

    @property
    def problems(self) -> list[str]:
        return list(self.data.get("problems", []))


# --- op tables from traces --------------------------------------------------------------------

# The engine's wait for an output: it overlaps the ops it waits for, so counting it counts them twice.
MXNET_WAIT_EVENTS = ("WaitForVar", "WaitForAll")


def mxnet_op_durations(events: list[dict]) -> list[tuple[str, float, float]]:
    """(op, start us, duration us) of every operator event: B/E pairs matched per thread, and X events."""
    spans, open_events = [], collections.defaultdict(list)
    for event in events:
        if event.get("cat") != "operator" or event.get("name") in MXNET_WAIT_EVENTS:
            continue
        phase = event.get("ph")
        if phase == "X":
            spans.append((event["name"], float(event["ts"]), float(event.get("dur", 0))))
        elif phase == "B":
            open_events[(event.get("pid"), event.get("tid"), event["name"])].append(float(event["ts"]))
        elif phase == "E":
            stack = open_events.get((event.get("pid"), event.get("tid"), event["name"]))
            if stack:
                start = stack.pop()
                spans.append((event["name"], start, float(event["ts"]) - start))
    return spans


def ort_op_durations(events: list[dict], skip_runs: int = 0) -> list[tuple[str, float, float]]:
    """(op type, start us, duration us) of every node kernel inside the model runs after `skip_runs`."""
    runs = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in events
                  if e.get("cat") == "Session" and e.get("name") == "model_run")
    windows = runs[skip_runs:]
    spans = []
    for event in events:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        start = float(event["ts"])
        if windows and not any(lo <= start <= hi for lo, hi in windows):
            continue
        op = (event.get("args") or {}).get("op_name") or event["name"].removesuffix("_kernel_time")
        spans.append((op, start, float(event.get("dur", 0))))
    return spans


def op_table(spans: list[tuple[str, float, float]], inferences: int) -> list[dict]:
    """Per op type: calls and milliseconds per inference, share of the profiled op time."""
    totals: dict[str, float] = collections.defaultdict(float)
    counts: dict[str, int] = collections.Counter()
    for op, _, duration in spans:
        totals[op] += duration
        counts[op] += 1
    grand = sum(totals.values()) or 1.0
    rows = [{"op": op, "calls_per_inference": counts[op] / inferences,
             "ms_per_inference": totals[op] / 1e3 / inferences, "share": totals[op] / grand,
             "calls": counts[op], "total_ms": totals[op] / 1e3}
            for op in totals]
    return sorted(rows, key=lambda row: -row["ms_per_inference"])


def op_table_text(rows: list[dict], title: str) -> str:
    lines = [title, f"{'op':<40} {'share':>7} {'ms/inf':>10} {'calls/inf':>10}"]
    for row in rows:
        lines.append(f"{row['op'][:40]:<40} {100 * row['share']:>6.1f}% {row['ms_per_inference']:>10.3f} "
                     f"{row['calls_per_inference']:>10.1f}")
    lines.append(f"{'total':<40} {100.0:>6.1f}% {sum(r['ms_per_inference'] for r in rows):>10.3f} "
                 f"{sum(r['calls_per_inference'] for r in rows):>10.1f}")
    return "\n".join(lines) + "\n"


# --- graphs: op counts and pictures -----------------------------------------------------------

@dataclass
class OpGraph:
    """A runtime-neutral view of a network: op nodes, their edges, and the graph inputs."""
    nodes: list[dict]        # {"id", "op", "label", "fused": [inner ops]}
    edges: list[tuple[str, str]]
    inputs: list[str]
    source: str

    def op_counts(self) -> dict[str, int]:
        return dict(collections.Counter(node["op"] for node in self.nodes).most_common())

    def fused_patterns(self) -> dict[str, int]:
        return dict(collections.Counter("+".join(node["fused"]) for node in self.nodes if node["fused"]).most_common())


def mxnet_graph(symbol_path: Path, input_names: list[str]) -> OpGraph:
    graph = json.loads(Path(symbol_path).read_text())
    nodes = graph["nodes"]
    kept, edges, inputs = [], [], []
    for index, node in enumerate(nodes):
        if node["op"] == "null":
            if node["name"] in input_names:
                inputs.append(f"n{index}")
            continue
        inner = [n["op"] for sub in node.get("subgraphs", []) for n in sub["nodes"] if n["op"] != "null"]
        kept.append({"id": f"n{index}", "op": node["op"], "label": node["op"], "fused": inner})
        for source, _, *_ in node["inputs"]:
            if nodes[source]["op"] != "null" or nodes[source]["name"] in input_names:
                edges.append((f"n{source}", f"n{index}"))
    return OpGraph(kept, edges, inputs, str(symbol_path))


def onnx_graph(path: Path) -> OpGraph:
    import onnx

    model = onnx.load(str(path))
    initializers = {init.name for init in model.graph.initializer}
    producers = {}
    kept, edges = [], []
    inputs = [f"in:{i.name}" for i in model.graph.input if i.name not in initializers]
    for index, node in enumerate(model.graph.node):
        op = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain.split('.')[-1]}.{node.op_type}"
        fused = []
        for attr in node.attribute:  # ORT records fused activations as attributes
            if attr.name == "activation" and attr.s:
                fused = [node.op_type, attr.s.decode()]
        kept.append({"id": f"n{index}", "op": op, "label": op, "fused": fused})
        for output in node.output:
            producers[output] = f"n{index}"
    graph_inputs = {i.name for i in model.graph.input if i.name not in initializers}
    for index, node in enumerate(model.graph.node):
        for name in node.input:
            if name in producers:
                edges.append((producers[name], f"n{index}"))
            elif name in graph_inputs:
                edges.append((f"in:{name}", f"n{index}"))
    return OpGraph(kept, edges, inputs, str(path))


_COLORS = (("conv", "#9ecae1"), ("gemm", "#9ecae1"), ("fully", "#9ecae1"), ("matmul", "#9ecae1"),
           ("quant", "#fdae6b"), ("pool", "#a1d99b"), ("resize", "#dadaeb"), ("upsampl", "#dadaeb"),
           ("bilinear", "#dadaeb"), ("concat", "#fdd0a2"), ("add", "#fdd0a2"), ("sum", "#fdd0a2"))


def _color(op: str) -> str:
    lowered = op.lower()
    return next((color for key, color in _COLORS if key in lowered), "#f0f0f0")


def graph_dot(graph: OpGraph, title: str) -> str:
    def quote(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    lines = ["digraph network {",
             f"  graph [label={quote(title)}, labelloc=t, fontsize=14, rankdir=TB, nodesep=0.15, ranksep=0.2];",
             '  node [shape=box, style="rounded,filled", fontsize=10, fontname="Helvetica", height=0.25];',
             "  edge [arrowsize=0.5];"]
    for name in graph.inputs:
        lines.append(f"  {quote(name)} [label=\"input\", shape=ellipse, fillcolor=\"#ffffff\"];")
    for node in graph.nodes:
        label = node["label"]
        if node["fused"]:
            label += "\\n" + "+".join(_short(op) for op in node["fused"])
        style = ', penwidth=2' if node["fused"] else ""
        lines.append(f"  {node['id']} [label=\"{label}\", fillcolor=\"{_color(node['op'])}\"{style}];")
    for source, target in graph.edges:
        lines.append(f"  {quote(source)} -> {target};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _short(op: str) -> str:
    return {"Convolution": "Conv", "BatchNorm": "BN", "Activation": "Act", "FullyConnected": "FC",
            "elemwise_add": "Add", "_contrib_quantize_v2": "Quantize", "_contrib_requantize": "Requantize"}.get(op, op)


def dot_binary() -> str | None:
    return shutil.which("dot")


def render_graph(dot_text: str, out_dir: Path) -> dict:
    """graph.dot always; graph.svg and graph.png when Graphviz's dot is installed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    dot_path = out_dir / "graph.dot"
    _write_text_atomic(dot_path, dot_text)
    result = {"dot": dot_path.name, "svg": None, "png": None, "note": ""}
    binary = dot_binary()
    if binary is None:
        result["note"] = "graph picture not rendered: Graphviz's `dot` is not installed (apt-get install graphviz)"
        return result
    for fmt, extra in (("svg", []), ("png", ["-Gdpi=72"])):
        target = out_dir / f"graph.{fmt}"
        tmp = out_dir / f".graph.{fmt}.tmp"
        try:
            subprocess.run([binary, f"-T{fmt}", *extra, "-o", str(tmp), str(dot_path)], check=True,
                           capture_output=True, timeout=GRAPH_RENDER_TIMEOUT_S)
            tmp.replace(target)
            result[fmt] = target.name
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
            tmp.unlink(missing_ok=True)
            detail = getattr(exc, "stderr", b"") or b""
            result["note"] = f"dot -T{fmt} failed: {' '.join(detail.decode(errors='replace').split())[:200] or exc}"
    return result


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


# --- the profile --------------------------------------------------------------------------------

def _portable_symbol(manifest: dict) -> str | None:
    return next((r["path"] for r in manifest["artifacts"]
                 if r["kind"] == "mxnet-portable" and r["format"] == "mxnet-symbol-json"), None)


def _fp32_onnx(manifest: dict) -> str | None:
    return next((r["path"] for r in manifest["artifacts"] if r["kind"] == "onnx" and r["format"] == "onnx"), None)


def _graph_summary(graph: OpGraph, build_dir: Path) -> dict:
    try:
        source = str(Path(graph.source).resolve().relative_to(build_dir.resolve()))
    except ValueError:
        source = graph.source
    return {"graph": source, "nodes": len(graph.nodes), "ops": graph.op_counts(),
            "fused_patterns": graph.fused_patterns()}


def fusion_report(build_dir: Path, manifest: dict, artifact: BenchArtifact, out_dir: Path) -> tuple[dict, OpGraph]:
    """Op counts before and after: portable vs the artifact's graph (and ONNX Runtime's optimized graph)."""
    input_names = list(manifest["model"]["inputs"])
    report: dict = {}
    if artifact.runtime in ("mxnet", "mxnet-imperative"):
        portable = _portable_symbol(manifest)
        before = mxnet_graph(build_dir / portable, input_names) if portable else None
        after = mxnet_graph(build_dir / artifact.files["symbol"], input_names) if "symbol" in artifact.files else before
    else:
        reference_onnx = _fp32_onnx(manifest) or artifact.files["onnx"]
        before = onnx_graph(build_dir / reference_onnx)
        after = onnx_graph(build_dir / artifact.files["onnx"])
        optimized = out_dir / "optimized.onnx"
        if optimized.exists():
            runtime_graph = onnx_graph(optimized)
            report["runtime_optimized"] = _graph_summary(runtime_graph, build_dir)
            # As big as the model and tied to this CPU (NCHWc layouts): summarized, not kept.
            report["runtime_optimized"]["graph"] = "onnxruntime-optimized"
            optimized.unlink()
            after_runtime = runtime_graph
        else:
            after_runtime = after
    if before is None:
        return {"note": "no portable graph in the build"}, after
    report["before"] = _graph_summary(before, build_dir)
    report["after"] = _graph_summary(after, build_dir)
    shown = after if artifact.runtime != "onnxruntime" else after_runtime
    final = report.get("runtime_optimized", report["after"])
    report["node_reduction"] = 1 - final["nodes"] / report["before"]["nodes"] if report["before"]["nodes"] else None
    return report, shown


def _safe_dir_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def profile_build(build_dir: Path, options: ProfileOptions = ProfileOptions(),
                  progress: Callable[[dict], None] | None = None) -> ProfileResult:
    """Profile the chosen artifacts; write traces, op tables, fusion reports and graph pictures."""
    options = options.validated()
    build_dir = Path(build_dir)
    manifest = load_manifest(build_dir)
    altered = check_artifact_hashes(build_dir, manifest)
    if altered:
        raise VerificationFailed(f"the build's files do not match its manifest ({altered[0]})",
                                 "run `infc verify` and rebuild with `infc compile`")
    emit = progress or (lambda event: None)
    artifacts, _ = discover_artifacts(manifest)
    if options.artifacts:
        artifacts = [a for a in select_artifacts(artifacts, options.artifacts)
                     if a.name in options.artifacts]
    out_root = Path(options.out_dir) if options.out_dir else build_dir / "profile"
    try:
        out_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write the profile to {out_root}: {exc.strerror or exc}",
                        "pass a writable --out-dir") from None
    reference = manifest.get("reference", {})
    entries, problems = [], []
    for index, artifact in enumerate(artifacts, 1):
        entry = {"name": artifact.name, "kind": artifact.kind, "runtime": artifact.runtime,
                 "precision": artifact.precision, "status": "not run"}
        entries.append(entry)
        reason = artifact.reason
        if not reason and artifact.runtime not in PROFILED_RUNTIMES:
            reason = "TensorRT layers are profiled on the GPU (trtexec --dumpProfile --exportLayerInfo)"
        if reason:
            entry["reason"] = f"not run: {reason}"
            emit({"event": "skipped", "artifact": artifact.name, "index": index, "total": len(artifacts),
                  "reason": reason})
            continue
        out_dir = out_root / _safe_dir_name(artifact.name)
        entry["dir"] = str(out_dir)

        def forward(event, artifact=artifact, index=index):
            emit({**event, "artifact": artifact.name, "index": index, "total": len(artifacts)})

        forward({"event": "start"})
        request = {"task": "profile", "build_dir": str(build_dir.resolve()), "artifact": artifact.to_dict(),
                   "model": manifest["model"]["name"], "input_names": list(manifest["model"]["inputs"]),
                   "build_input_shape": next(iter(manifest["model"]["inputs"].values()))["shape"],
                   "inputs": {"kind": "reference", "path": reference.get("inputs", "reference/inputs.npz")},
                   "mxnet_flags": manifest.get("target", {}).get("mxnet"), "threads": None,
                   "warmup": options.warmup, "iterations": options.iterations, "out_dir": str(out_dir)}
        try:
            measured = run_worker(request, forward, env_extra={"MXNET_EXEC_BULK_EXEC_INFERENCE": "0"})
        except WorkerFailed as exc:
            entry.update(status="failed", reason=str(exc))
            problems.append(f"{artifact.name} could not be profiled: {exc}")
            forward({"event": "failed", "reason": str(exc)})
            continue
        events = json.loads((out_dir / measured["trace"]).read_text())["traceEvents"]
        if artifact.runtime == "onnxruntime":
            spans = ort_op_durations(events, skip_runs=options.warmup)
        else:
            spans = mxnet_op_durations(events)
        rows = op_table(spans, options.iterations)
        write_json_atomic(out_dir / "op_table.json", {"artifact": artifact.name, "iterations": options.iterations,
                                                      "rows": rows})
        title = (f"{manifest['model']['name']} {artifact.name}: {options.iterations} profiled inference(s) "
                 f"after {options.warmup} warm-up")
        _write_text_atomic(out_dir / "op_table.txt", op_table_text(rows, title))
        if "aggregate_stats" in measured:
            _write_text_atomic(out_dir / "mxnet_aggregate_stats.txt", measured["aggregate_stats"])
        fusion, shown = fusion_report(build_dir, manifest, artifact, out_dir)
        write_json_atomic(out_dir / "fusion.json", fusion)
        graph = {"dot": None, "svg": None, "png": None, "note": "graph picture not requested"}
        if options.graph and shown is not None:
            forward({"event": "phase", "phase": "graph picture"})
            graph = render_graph(graph_dot(shown, f"{manifest['model']['name']}: {artifact.name} "
                                                  f"({len(shown.nodes)} ops)"), out_dir)
        entry.update(status="ok", trace=f"{out_dir.name}/trace.json", op_table=rows,
                     profiled_ms_per_inference=sum(r["ms_per_inference"] for r in rows),
                     iterations=options.iterations, warmup=options.warmup, fusion=fusion,
                     graph={k: (f"{out_dir.name}/{v}" if v and k != "note" else v) for k, v in graph.items()})
        forward({"event": "done", "ms": entry["profiled_ms_per_inference"], "graph_note": graph["note"]})
    data = {"schema": PROFILE_SCHEMA, "model": manifest["model"]["name"], "target": manifest["target"]["name"],
            "build_dir": str(build_dir), "artifacts": entries, "problems": problems}
    write_json_atomic(out_root / "profile.json", data)
    return ProfileResult(out_root, data)


def load_profile(out_root: Path) -> dict | None:
    path = Path(out_root) / "profile.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and data.get("schema") == PROFILE_SCHEMA else None


def profile_summary(data: dict, top: int = 8) -> str:
    lines = []
    for entry in data["artifacts"]:
        if entry["status"] != "ok":
            lines.append(f"{entry['name']}: {entry['status']}: {entry.get('reason', '').removeprefix('not run: ')}")
            continue
        fusion = entry["fusion"]
        before, after = fusion.get("before", {}), fusion.get("runtime_optimized", fusion.get("after", {}))
        lines.append(f"{entry['name']} ({entry['runtime']}): {entry['profiled_ms_per_inference']:.2f} ms of ops per "
                     f"inference; graph {before.get('nodes', '?')} -> {after.get('nodes', '?')} ops; "
                     f"trace {entry['trace']}")
        for row in entry["op_table"][:top]:
            lines.append(f"    {row['op'][:38]:<38} {100 * row['share']:5.1f}%  {row['ms_per_inference']:9.3f} ms  "
                         f"x{row['calls_per_inference']:.0f}")
        graph = entry["graph"]
        if graph.get("svg") or graph.get("png"):
            lines.append(f"    graph: {graph.get('svg')} {graph.get('png')}")
        elif graph.get("note"):
            lines.append(f"    {graph['note']}")
    lines.extend(f"problem: {p}" for p in data.get("problems", []))
    return "\n".join(lines)
