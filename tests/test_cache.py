"""The content-addressed stage store (compiler/cache.py) and `infc cache ls|prune`."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from compiler import cache as cache_mod
from compiler.cache import StageCache, parse_duration
from compiler.cli import main


def key_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def make_files(root: Path, contents: dict[str, bytes]) -> dict[str, Path]:
    files = {}
    for name, data in contents.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        files[name] = path
    return files


@pytest.fixture
def store(tmp_path):
    return StageCache(tmp_path / "cache")


@pytest.fixture
def sources(tmp_path):
    return make_files(tmp_path / "staging", {"onnx/model.onnx": b"graph" * 1000, "notes.json": b"{}"})


def test_put_then_get_returns_same_content_and_meta(store, sources):
    key = key_of("onnx")
    stored = store.put(key, sources, {"stage": "onnx", "model": "resnet18_v1"})
    assert stored.path == store.root / "stages" / key[:2] / key
    hit = store.get(key)
    assert hit is not None and hit.key == key
    assert hit.meta == {"stage": "onnx", "model": "resnet18_v1"}
    assert set(hit.files) == {"onnx/model.onnx", "notes.json"}
    for name, path in hit.files.items():
        assert path.read_bytes() == sources[name].read_bytes()
        assert str(path).startswith(str(stored.path))
    assert key in store and key_of("other") not in store


def test_materialize_places_files_into_a_build_without_touching_the_store(store, sources, tmp_path):
    key = key_of("materialize")
    store.put(key, sources, {"stage": "onnx"})
    build = tmp_path / "build"
    (build / "onnx").mkdir(parents=True)
    (build / "onnx" / "model.onnx").write_bytes(b"stale")
    placed = store.get(key).materialize(build)
    assert placed == {"onnx/model.onnx": build / "onnx" / "model.onnx", "notes.json": build / "notes.json"}
    assert (build / "onnx" / "model.onnx").read_bytes() == b"graph" * 1000
    assert sorted(p.name for p in (build / "onnx").iterdir()) == ["model.onnx"]  # no temp names left
    # Replacing (not rewriting) a materialized file leaves the entry intact.
    (build / "notes.json").unlink()
    (build / "notes.json").write_bytes(b"rewritten")
    assert store.get(key, verify=True) is not None


def test_miss_returns_none_and_creates_nothing(store):
    assert store.get(key_of("absent")) is None
    assert not store.root.exists()
    assert store.ls() == [] and store.prune() == (0, 0)


@pytest.mark.parametrize("bad", ["", "../../etc", "ABCDEF0123", "abc", "g" * 64, "ab/cdef0123", None])
def test_keys_must_be_hex(store, sources, bad):
    with pytest.raises(ValueError):
        store.put(bad, sources, {})
    with pytest.raises(ValueError):
        store.get(bad)


@pytest.mark.parametrize("bad", ["/abs/file", "../up", "a/../../b", "a//b", "./a", "", "a\\b"])
def test_file_names_must_be_relative_and_normalized(store, sources, bad):
    with pytest.raises(ValueError):
        store.put(key_of("x"), {bad: sources["notes.json"]}, {})
    assert not (store.root / "stages").exists()


def test_bad_inputs_leave_no_entry(store, sources, tmp_path):
    with pytest.raises(FileNotFoundError):
        store.put(key_of("x"), {"missing": tmp_path / "nope"}, {})
    with pytest.raises(TypeError):
        store.put(key_of("x"), sources, {"not json": object()})
    assert store.ls() == [] and key_of("x") not in store


def test_first_put_of_a_key_wins(store, sources, tmp_path):
    key = key_of("same")
    store.put(key, sources, {"stage": "first"})
    other = make_files(tmp_path / "other", {"onnx/model.onnx": b"different"})
    again = store.put(key, other, {"stage": "second"})
    assert again.meta == {"stage": "first"}
    assert again.files["onnx/model.onnx"].read_bytes() == sources["onnx/model.onnx"].read_bytes()


def test_files_are_hard_linked_when_possible(store, sources):
    stored = store.put(key_of("link"), sources, {})
    assert os.path.samefile(stored.files["notes.json"], sources["notes.json"])


def test_files_are_copied_when_links_fail(store, sources, monkeypatch):
    def no_links(*args, **kwargs):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(cache_mod.os, "link", no_links)
    stored = store.put(key_of("copy"), sources, {})
    assert not os.path.samefile(stored.files["notes.json"], sources["notes.json"])
    assert stored.files["notes.json"].read_bytes() == b"{}"


def test_get_drops_an_entry_whose_files_changed(store, sources):
    key = key_of("edited")
    store.put(key, sources, {})
    # The entry shares the file with the build (hard link): an in-place edit of the build reaches it.
    with open(sources["onnx/model.onnx"], "ab") as handle:
        handle.write(b"edited")
    assert store.get(key) is None
    assert key not in store and store.ls() == []


def test_verify_catches_same_size_same_mtime_edits(store, sources):
    key = key_of("sneaky")
    stored = store.put(key, sources, {})
    path = stored.files["onnx/model.onnx"]
    before = path.stat()
    path.write_bytes(b"x" * before.st_size)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert store.get(key) is not None  # size and mtime cannot see it
    assert store.get(key, verify=True) is None
    assert key not in store


def test_get_marks_the_entry_used(store, sources):
    key = key_of("used")
    stored = store.put(key, sources, {})
    old = time.time() - 30 * 86400
    os.utime(stored.path / "last-used", (old, old))
    assert store.ls()[0].last_used == pytest.approx(old, abs=1)
    store.get(key)
    assert store.ls()[0].last_used > time.time() - 60


def test_ls_lists_stage_size_and_use_newest_first(store, tmp_path):
    now = time.time()
    for index, stage in enumerate(["load", "onnx", "onnx-fp16"]):
        files = make_files(tmp_path / stage, {f"{stage}.bin": b"x" * (100 * (index + 1))})
        stored = store.put(key_of(stage), files, {"stage": stage})
        os.utime(stored.path / "last-used", (now - 1000 * index, now - 1000 * index))
    entries = store.ls()
    assert [e.stage for e in entries] == ["load", "onnx", "onnx-fp16"]
    assert [e.bytes for e in entries] == [100, 200, 300] == [e.size for e in entries]
    assert entries[0].file_count == 1 and entries[0].to_dict()["meta"] == {"stage": "load"}
    assert store.total_bytes() == 600


def test_prune_older_than_removes_only_stale_entries(store, tmp_path):
    now = time.time()
    ages = {"fresh": 60, "day": 86400 + 60, "month": 30 * 86400}
    for name, age in ages.items():
        stored = store.put(key_of(name), make_files(tmp_path / name, {"f": b"y" * 10}), {"stage": name})
        os.utime(stored.path / "last-used", (now - age, now - age))
    assert store.prune(7 * 86400) == (1, 10)
    assert sorted(e.stage for e in store.ls()) == ["day", "fresh"]
    assert store.prune(3600) == (1, 10)
    assert [e.stage for e in store.ls()] == ["fresh"]
    assert store.prune(None) == (1, 10)
    assert store.ls() == [] and list((store.root / "stages").iterdir()) == []
    assert list((store.root / "tmp").iterdir()) == []
    with pytest.raises(ValueError):
        store.prune(-1)


def test_prune_clears_abandoned_puts_but_not_fresh_ones(store, sources):
    store.put(key_of("keep"), sources, {})
    abandoned = store.root / "tmp" / "put-dead"
    (abandoned / "files").mkdir(parents=True)
    old = time.time() - 2 * cache_mod.STALE_TMP_SECONDS
    os.utime(abandoned, (old, old))
    in_progress = store.root / "tmp" / "put-running"
    in_progress.mkdir()
    store.prune(86400)
    assert not abandoned.exists() and in_progress.exists()
    assert key_of("keep") in store


def test_a_half_written_entry_is_never_visible(store, sources):
    key = key_of("partial")
    entry = store.entry_path(key)
    (entry / "files").mkdir(parents=True)  # what a crashed writer without the rename would leave
    assert store.get(key) is None and store.ls() == []
    stored = store.put(key, sources, {"stage": "onnx"})
    assert stored.meta == {"stage": "onnx"}


def _put_many(root, key, source_dir, rounds, queue):
    try:
        store = StageCache(Path(root))
        sources = {p.name: p for p in Path(source_dir).iterdir()}
        for _ in range(rounds):
            stored = store.put(key, sources, {"stage": "race"})
            assert store.get(key) is not None
            assert sorted(stored.files) == ["a.bin", "b.bin"]
        queue.put("ok")
    except BaseException as exc:  # reported to the parent, which asserts
        queue.put(repr(exc))


def test_concurrent_puts_of_the_same_key_are_safe(store, tmp_path):
    key = key_of("race")
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    workers = []
    for index in range(3):
        source = tmp_path / f"src{index}"
        make_files(source, {"a.bin": b"a" * 4096, "b.bin": b"b" * 8192})
        workers.append(context.Process(target=_put_many, args=(str(store.root), key, str(source), 20, queue)))
    for worker in workers:
        worker.start()
    results = [queue.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert results == ["ok"] * 3
    entries = store.ls()
    assert [e.key for e in entries] == [key] and entries[0].bytes == 4096 + 8192
    assert store.get(key, verify=True) is not None
    assert list((store.root / "tmp").iterdir()) == []


def test_default_root_follows_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("INFC_CACHE_DIR", str(tmp_path / "explicit"))
    assert StageCache().root == tmp_path / "explicit"
    monkeypatch.delenv("INFC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert StageCache().root == tmp_path / "xdg" / "infc"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert StageCache().root == tmp_path / "home" / ".cache" / "infc"


@pytest.mark.parametrize("text,seconds", [("7d", 7 * 86400), ("12h", 43200), ("30m", 1800), ("90s", 90),
                                          ("2w", 14 * 86400), ("45", 45), ("1.5h", 5400)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "d", "7x", "-1d", "7 days"])
def test_parse_duration_rejects(text):
    with pytest.raises(ValueError):
        parse_duration(text)


# --- CLI ------------------------------------------------------------------------------------

def test_cli_ls_and_prune(tmp_path, capsys, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("INFC_CACHE_DIR", str(root))
    store = StageCache()
    now = time.time()
    for name, age in (("onnx", 10), ("load", 10 * 86400)):
        stored = store.put(key_of(name), make_files(tmp_path / name, {"f": b"z" * 2000}),
                           {"stage": name, "model": "resnet18_v1"})
        os.utime(stored.path / "last-used", (now - age, now - age))

    assert main(["cache", "ls"]) == 0
    out = capsys.readouterr().out
    assert "onnx" in out and "load" in out and "resnet18_v1" in out and "2 entries" in out
    assert out.index(key_of("onnx")[:16]) < out.index(key_of("load")[:16])

    assert main(["cache", "ls", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["root"] == str(root) and [e["stage"] for e in listing["entries"]] == ["onnx", "load"]

    assert main(["cache", "prune", "--older-than", "7d"]) == 0
    assert "removed 1 entries unused for 7d" in capsys.readouterr().out
    assert [e.stage for e in store.ls()] == ["onnx"]

    assert main(["cache", "prune", "--older-than", "soon"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--older-than" in err and "7d" in err

    assert main(["cache", "prune", "--json", "--cache-dir", str(root)]) == 0
    assert json.loads(capsys.readouterr().out) == {"root": str(root), "removed": 1, "bytes": 2000}
    assert store.ls() == []
