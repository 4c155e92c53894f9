"""`infc profile`: op tables from traces, fusion counts, graph pictures, and the CLI."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ElementTree

import pytest

from compiler.errors import UserError
from compiler.profiling import (graph_dot, mxnet_graph, mxnet_op_durations, onnx_graph, op_table, ort_op_durations,
                                render_graph)

from .conftest import run_cli

needs_dot = pytest.mark.skipif(shutil.which("dot") is None,
                               reason="Graphviz's dot is not installed (apt-get install graphviz)")


def test_mxnet_trace_pairs_begin_end_per_thread_and_drops_waits():
    events = [
        {"name": "Convolution", "cat": "operator", "ph": "B", "ts": 100, "pid": 0, "tid": 1},
        {"name": "Convolution", "cat": "operator", "ph": "B", "ts": 110, "pid": 0, "tid": 2},
        {"name": "Convolution", "cat": "operator", "ph": "E", "ts": 130, "pid": 0, "tid": 1},
        {"name": "Convolution", "cat": "operator", "ph": "E", "ts": 150, "pid": 0, "tid": 2},
        {"name": "WaitForVar", "cat": "operator", "ph": "B", "ts": 100, "pid": 0, "tid": 3},
        {"name": "WaitForVar", "cat": "operator", "ph": "E", "ts": 160, "pid": 0, "tid": 3},
        {"name": "Pooling", "cat": "operator", "ph": "X", "ts": 150, "dur": 10, "pid": 0, "tid": 1},
        {"name": "Pooling", "cat": "operator", "ph": "b", "ts": 150, "pid": 9, "tid": 9},  # async duplicate
        {"name": "MXNet C API Calls", "cat": "MXNET_C_API", "ph": "C", "ts": 100, "pid": 0, "tid": 1},
    ]
    spans = mxnet_op_durations(events)
    assert sorted(spans) == [("Convolution", 100.0, 30.0), ("Convolution", 110.0, 40.0), ("Pooling", 150.0, 10.0)]
    rows = op_table(spans, inferences=2)
    assert [(r["op"], r["calls_per_inference"], r["ms_per_inference"]) for r in rows] == [
        ("Convolution", 1.0, pytest.approx(0.035)), ("Pooling", 0.5, pytest.approx(0.005))]
    assert sum(r["share"] for r in rows) == pytest.approx(1.0)
    assert rows[0]["share"] == pytest.approx(70 / 80)


def test_ort_trace_skips_warmup_runs():
    def run(ts, dur):
        return {"cat": "Session", "name": "model_run", "ph": "X", "ts": ts, "dur": dur}

    def node(ts, dur, op):
        return {"cat": "Node", "name": f"n{ts}_kernel_time", "ph": "X", "ts": ts, "dur": dur, "args": {"op_name": op}}

    events = [run(0, 100), node(10, 80, "Conv"), run(200, 50), node(210, 20, "Conv"), node(240, 5, "Relu"),
              {"cat": "Node", "name": "n215_fence_before", "ph": "X", "ts": 215, "dur": 1, "args": {"op_name": "Conv"}}]
    assert sorted(ort_op_durations(events, skip_runs=1)) == [("Conv", 210.0, 20.0), ("Relu", 240.0, 5.0)]
    assert len(ort_op_durations(events, skip_runs=0)) == 3


def test_fused_mxnet_graph_shows_what_each_node_absorbed(small_builds):
    build = small_builds["x86-mkldnn"]
    portable = mxnet_graph(build / "mxnet/portable-symbol.json", ["data"])
    fused = mxnet_graph(build / "mxnet/mkldnn-symbol.json", ["data"])
    assert portable.op_counts()["Convolution"] == fused.op_counts()["_sg_mkldnn_conv"]
    assert len(fused.nodes) < len(portable.nodes)
    patterns = fused.fused_patterns()
    assert all(pattern.startswith("Convolution") or pattern.startswith("FullyConnected") for pattern in patterns)
    assert sum(n for p, n in patterns.items() if "BatchNorm" in p) > 0
    dot = graph_dot(fused, "t")
    assert dot.count("->") == len(fused.edges) and "Conv+BN" in dot


def test_graph_without_dot_keeps_the_source_and_says_why(tmp_path, monkeypatch, small_builds):
    import compiler.profiling as profiling

    monkeypatch.setattr(profiling, "dot_binary", lambda: None)
    result = render_graph(graph_dot(onnx_graph(small_builds["x86-mkldnn"] / "onnx/model.onnx"), "t"), tmp_path)
    assert result["svg"] is None and result["png"] is None and "apt-get install graphviz" in result["note"]
    assert (tmp_path / "graph.dot").read_text().startswith("digraph")


@needs_dot
def test_profile_writes_trace_op_table_fusion_and_picture(capsys, small_builds, tmp_path):
    build = small_builds["x86-mkldnn"]
    out = tmp_path / "profile"
    assert run_cli(["profile", build, "--artifact", "mxnet-mkldnn", "--artifact", "onnx", "--iterations", "2",
                    "--out-dir", out, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [e["name"] for e in data["artifacts"]] == ["mxnet-mkldnn", "onnx"]
    assert json.loads((out / "profile.json").read_text())["artifacts"] == data["artifacts"]
    for entry in data["artifacts"]:
        assert entry["status"] == "ok", entry
        directory = out / entry["name"]
        trace = json.loads((directory / "trace.json").read_text())
        assert isinstance(trace["traceEvents"], list) and trace["traceEvents"]
        rows = json.loads((directory / "op_table.json").read_text())["rows"]
        assert rows == entry["op_table"] and sum(r["share"] for r in rows) == pytest.approx(1.0)
        assert "share" in (directory / "op_table.txt").read_text()
        fusion = json.loads((directory / "fusion.json").read_text())
        optimized = fusion.get("runtime_optimized", fusion["after"])
        assert optimized["nodes"] < fusion["before"]["nodes"]
        ElementTree.fromstring((directory / "graph.svg").read_bytes())  # well-formed SVG
        assert (directory / "graph.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert not list(directory.glob(".*"))  # no temporary files left behind
    mkldnn, onnx = data["artifacts"]
    assert mkldnn["op_table"][0]["op"] == "_sg_mkldnn_conv"  # fused convolutions dominate
    assert mkldnn["op_table"][0]["calls_per_inference"] == mkldnn["fusion"]["after"]["ops"]["_sg_mkldnn_conv"]
    assert "Conv" in {r["op"] for r in onnx["op_table"]}
    assert not (out / "onnx" / "optimized.onnx").exists()  # summarized, not kept


def test_profile_rejects_unknown_artifacts_and_bad_counts(capsys, small_builds):
    build = small_builds["x86-mkldnn"]
    for args, needle in ((["profile", build, "--artifact", "nope"], "pick from"),
                         (["profile", build, "--iterations", "0"], "--iterations 0")):
        assert run_cli(args) == UserError.exit_code
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and needle in err, err
