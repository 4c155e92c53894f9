"""`infc package`, `infc unpack`, `infc verify BUNDLE` on real (small) builds, and hostile tarballs."""

from __future__ import annotations

import calendar
import hashlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from small_builds import FP16_MODEL, build_once  # noqa: E402

from compiler import bundle as bundle_mod  # noqa: E402
from compiler.cli import main  # noqa: E402
from compiler.device import build_engine  # noqa: E402
from compiler.verify import verify_build  # noqa: E402


@pytest.fixture(scope="session")
def x86_build(tmp_path_factory):
    return build_once(tmp_path_factory, "x86-mkldnn")


@pytest.fixture(scope="session")
def jetson_build(tmp_path_factory):
    return build_once(tmp_path_factory, "jetson", model=FP16_MODEL)


@pytest.fixture(scope="session")
def x86_bundle(x86_build, tmp_path_factory):
    path = tmp_path_factory.mktemp("bundles") / "x86.tar.gz"
    assert main(["package", str(x86_build), "-o", str(path)]) == 0
    return path


@pytest.fixture(scope="session")
def jetson_bundle(jetson_build, tmp_path_factory):
    path = tmp_path_factory.mktemp("bundles") / "jetson.tar.gz"
    assert main(["package", str(jetson_build), "-o", str(path)]) == 0
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def tree(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


# --- packaging ------------------------------------------------------------------------------

def test_packaging_twice_gives_identical_bytes(x86_build, x86_bundle, tmp_path, capsys):
    again = tmp_path / "again.tgz"
    code, out, _ = run_cli(capsys, "package", x86_build, "-o", again)
    assert code == 0 and "sha256" in out
    assert sha256(again) == sha256(x86_bundle)


def test_bundle_bytes_do_not_depend_on_file_times_or_location(x86_build, x86_bundle, tmp_path):
    copy = tmp_path / "elsewhere" / "x86-copy"
    shutil.copytree(x86_build, copy)
    later = time.time() + 1000
    for path in copy.rglob("*"):
        os.utime(path, (later, later))
    result = bundle_mod.package_build(copy, tmp_path / "copy.tar.gz")
    assert result.sha256 == sha256(x86_bundle)


def test_gzip_header_has_no_name_and_no_time(x86_bundle):
    header = x86_bundle.read_bytes()[:10]
    assert header[:2] == b"\x1f\x8b"
    assert header[3] & 0x08 == 0  # FNAME flag
    assert header[4:8] == b"\x00\x00\x00\x00"  # MTIME


def test_members_sorted_with_fixed_owner_mode_and_time(x86_build, x86_bundle):
    manifest = json.loads((x86_build / "manifest.json").read_text())
    created = calendar.timegm(time.strptime(manifest["created"], "%Y-%m-%dT%H:%M:%SZ"))
    with tarfile.open(x86_bundle) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names)
    root = f"{manifest['model']['name']}-{manifest['target']['name']}"
    assert names[0] == root and all(n == root or n.startswith(root + "/") for n in names)
    for member in members:
        assert (member.uid, member.gid, member.uname, member.gname) == (0, 0, "root", "root")
        assert member.mtime == created
        expected = 0o755 if member.isdir() or member.name.endswith(".py") else 0o644
        assert member.mode == expected, member.name


def test_bundle_holds_build_files_at_manifest_paths_plus_bundle_files(x86_build, x86_bundle):
    manifest = json.loads((x86_build / "manifest.json").read_text())
    with tarfile.open(x86_bundle) as tar:
        root = tar.getmembers()[0].name
        files = {m.name[len(root) + 1:]: m for m in tar.getmembers() if m.isfile() or m.islnk()}
        sums = tar.extractfile(f"{root}/SHA256SUMS").read().decode().splitlines()
        info = json.loads(tar.extractfile(f"{root}/bundle.json").read())
        run_script = tar.extractfile(f"{root}/run.py").read()
        readme = tar.extractfile(f"{root}/README.txt").read().decode()
    expected = {a["path"] for a in manifest["artifacts"]} | {"manifest.json", "run.py", "README.txt",
                                                               "bundle.json", "SHA256SUMS"}
    assert set(files) == expected
    assert {"reference/inputs.npz", "reference/outputs.npz"} <= set(files)
    listed = dict(reversed(line.split("  ", 1)) for line in sums)
    assert set(listed) == expected - {"SHA256SUMS"}
    for artifact in manifest["artifacts"]:
        assert listed[artifact["path"]] == artifact["sha256"]
    assert listed["manifest.json"] == sha256(x86_build / "manifest.json")
    assert run_script == (Path(bundle_mod.__file__).parent / "device" / "run.py").read_bytes()
    assert info["model"] == manifest["model"]["name"] and info["target"] == "x86-mkldnn"
    assert info["entrypoints"]["run"] == "run.py" and info["entrypoints"]["build_engine"] is None
    assert {f["path"] for f in info["files"]} == expected - {"SHA256SUMS", "bundle.json"}
    assert "random weights" in readme and "python3 run.py" in readme


def test_jetson_bundle_carries_build_kit_and_reference(jetson_build, jetson_bundle):
    with tarfile.open(jetson_bundle) as tar:
        root = tar.getmembers()[0].name
        names = {m.name[len(root) + 1:] for m in tar.getmembers()}
        links = {m.name[len(root) + 1:]: m.linkname[len(root) + 1:] for m in tar.getmembers() if m.islnk()}
        info = json.loads(tar.extractfile(f"{root}/bundle.json").read())
        readme = tar.extractfile(f"{root}/README.txt").read().decode()
    assert {"build_kit/build_engine.py", "build_kit/builder_settings.json", "build_kit/model.onnx",
            "build_kit/model.fp16.onnx", "build_kit/reference_inputs.npz", "build_kit/reference_outputs.npz",
            "reference/inputs.npz", "reference/outputs.npz"} <= names
    # The kit repeats the ONNX graphs: stored once, the repeat is a hard link to the first copy.
    assert links["onnx/model.onnx"] == "build_kit/model.onnx"
    assert info["entrypoints"]["build_engine"] == "build_kit/build_engine.py"
    assert "python3 build_kit/build_engine.py" in readme and "JetPack 6.1" in readme


def test_package_refuses_failed_build(x86_build, tmp_path, capsys):
    copy = tmp_path / "failed"
    shutil.copytree(x86_build, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["status"] = "failed"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_cli(capsys, "package", copy, "-o", tmp_path / "b.tar.gz")
    assert code == 2 and err.count("\n") == 1
    assert "status 'failed'" in err and "infc compile" in err
    assert not (tmp_path / "b.tar.gz").exists()


def test_package_refuses_build_whose_hashes_do_not_verify(x86_build, tmp_path, capsys):
    copy = tmp_path / "altered"
    shutil.copytree(x86_build, copy)
    with open(copy / "onnx" / "model.onnx", "ab") as handle:
        handle.write(b"\0")
    code, _, err = run_cli(capsys, "package", copy, "-o", tmp_path / "b.tar.gz")
    assert code == 2 and "onnx/model.onnx" in err and "infc compile" in err
    assert list(tmp_path.glob("*.tar.gz")) == [] and list(tmp_path.glob(".*")) == []


@pytest.mark.parametrize("case", ["not-a-build", "bad-suffix", "missing-parent"])
def test_package_bad_arguments(x86_build, tmp_path, capsys, case):
    args = {"not-a-build": (tmp_path, tmp_path / "b.tar.gz"),
            "bad-suffix": (x86_build, tmp_path / "b.zip"),
            "missing-parent": (x86_build, tmp_path / "nowhere" / "b.tar.gz")}[case]
    code, _, err = run_cli(capsys, "package", args[0], "-o", args[1])
    assert code == 2 and err.count("\n") == 1, err
    assert not args[1].exists()


def test_default_bundle_name_sits_beside_the_build(x86_build, tmp_path):
    copy = tmp_path / "resnet" / "x86-mkldnn"
    shutil.copytree(x86_build, copy)
    result = bundle_mod.package_build(copy)
    assert result.path == copy.parent / "x86-mkldnn.tar.gz" and result.path.is_file()


# --- unpack and verify --------------------------------------------------------------------

def test_unpack_verifies_and_gives_a_build_directory(x86_build, x86_bundle, tmp_path, capsys):
    dest = tmp_path / "device" / "model"
    code, out, _ = run_cli(capsys, "unpack", x86_bundle, dest)
    assert code == 0 and "hashes verified" in out
    assert (dest / "manifest.json").read_bytes() == (x86_build / "manifest.json").read_bytes()
    assert verify_build(dest)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model"]  # no temp leftovers
    code, out, _ = run_cli(capsys, "verify", dest)
    assert code == 0


def test_verify_bundle_runs_bundle_and_build_checks(x86_bundle, capsys):
    code, out, _ = run_cli(capsys, "verify", x86_bundle, "--json")
    assert code == 0
    report = json.loads(out)
    names = [(c["name"], c["status"]) for c in report["checks"]]
    assert names[:2] == [("safe-extract", "passed"), ("bundle-sha256", "passed")]
    assert ("onnxruntime-parity", "passed") in names and ("reload-parity", "passed") in names


def test_unpack_refuses_non_empty_destination_unless_forced(x86_bundle, tmp_path, capsys):
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    code, _, err = run_cli(capsys, "unpack", x86_bundle, dest)
    assert code == 2 and "--force" in err and (dest / "keep.txt").exists()
    code, _, _ = run_cli(capsys, "unpack", x86_bundle, dest, "--force")
    assert code == 0 and not (dest / "keep.txt").exists() and (dest / "manifest.json").exists()


def rewrite_bundle(source: Path, target: Path, replace=None, extra=()):
    """Copy a bundle member by member, replacing some files' bytes and appending extra members."""
    replace = replace or {}
    with tarfile.open(source) as src, tarfile.open(target, "w:gz") as dst:
        root = src.getmembers()[0].name
        for member in src.getmembers():
            relative = member.name[len(root) + 1:]
            if member.isfile():
                data = replace.get(relative, src.extractfile(member).read())
                member.size = len(data)
                dst.addfile(member, io.BytesIO(data))
            else:
                dst.addfile(member)
        for info, data in extra:
            info.name = info.name.replace("ROOT", root)
            info.linkname = info.linkname.replace("ROOT", root)
            if data is not None:
                info.size = len(data)
            dst.addfile(info, io.BytesIO(data) if data is not None else None)


def member(name, kind=tarfile.REGTYPE, link="", mode=0o644):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, link, mode
    return info


def assert_nothing_written(sandbox: Path, tmp_path: Path):
    assert list(sandbox.iterdir()) == []
    assert not (tmp_path / "evil").exists() and not (tmp_path / "outside").exists()


@pytest.mark.parametrize("case,extra,needle", [
    ("dotdot", [(member("ROOT/../../evil"), b"x")], "'..'"),
    ("dotdot-top", [(member("../evil"), b"x")], "'..'"),
    ("absolute", [(member("/tmp/infc-test-absolute-evil"), b"x")], "absolute"),
    ("symlink-escape", [(member("ROOT/outside", tarfile.SYMTYPE, "../../outside"), None)], "outside"),
    ("symlink-absolute", [(member("ROOT/etc", tarfile.SYMTYPE, "/etc"), None)], "absolute"),
    ("through-symlink", [(member("ROOT/here", tarfile.SYMTYPE, "."), None),
                         (member("ROOT/here/file"), b"x")], "symlink"),
    ("hardlink-escape", [(member("ROOT/passwd", tarfile.LNKTYPE, "../../etc/passwd"), None)], "'..'"),
    ("hardlink-unknown", [(member("ROOT/copy", tarfile.LNKTYPE, "ROOT/nope"), None)], "hard link"),
    ("char-device", [(member("ROOT/tty", tarfile.CHRTYPE), None)], "character device"),
    ("block-device", [(member("ROOT/sda", tarfile.BLKTYPE), None)], "block device"),
    ("fifo", [(member("ROOT/pipe", tarfile.FIFOTYPE), None)], "FIFO"),
    ("duplicate", [(member("ROOT/run.py"), b"print('other')")], "twice"),
])
def test_unpack_refuses_hostile_members(x86_bundle, tmp_path, capsys, case, extra, needle):
    hostile = tmp_path / f"{case}.tar.gz"
    rewrite_bundle(x86_bundle, hostile, extra=[(info, data) for info, data in extra])
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    code, _, err = run_cli(capsys, "unpack", hostile, sandbox / "dest")
    assert code == 2, err
    assert err.count("\n") == 1 and needle in err and "nothing was extracted" in err
    assert_nothing_written(sandbox, tmp_path)
    assert not Path("/tmp/infc-test-absolute-evil").exists()
    code, _, err = run_cli(capsys, "verify", hostile)
    assert code == 2 and needle in err


def test_unpack_size_limits(x86_bundle, tmp_path, capsys):
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    code, _, err = run_cli(capsys, "unpack", x86_bundle, sandbox / "d", "--max-member-size", "64K")
    assert code == 2 and "limit per member" in err
    code, _, err = run_cli(capsys, "unpack", x86_bundle, sandbox / "d", "--max-total-size", "1M")
    assert code == 2 and "total limit" in err
    code, _, err = run_cli(capsys, "unpack", x86_bundle, sandbox / "d", "--max-total-size", "lots")
    assert code == 2 and "--max-total-size" in err
    assert_nothing_written(sandbox, tmp_path)


def test_hard_links_count_against_the_total_limit(x86_bundle, tmp_path):
    # Many links to one large member would otherwise write far more than the headers admit.
    with tarfile.open(x86_bundle) as tar:
        root = tar.getmembers()[0].name
        biggest = max((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.size)
    links = [(member(f"ROOT/copy{i}", tarfile.LNKTYPE, biggest.name), None) for i in range(3)]
    hostile = tmp_path / "links.tar.gz"
    rewrite_bundle(x86_bundle, hostile, extra=links)
    total = sum(m.size for m in tarfile.open(x86_bundle).getmembers())
    limits = bundle_mod.ExtractLimits(max_total_bytes=total + biggest.size)
    with pytest.raises(bundle_mod.UserError, match="total limit"):
        bundle_mod.unpack_bundle(hostile, tmp_path / "dest", limits=limits)
    assert root and not (tmp_path / "dest").exists()


@pytest.mark.parametrize("case", ["altered-artifact", "altered-run-script", "unlisted-file"])
def test_unpack_refuses_content_that_does_not_match_checksums(x86_bundle, tmp_path, capsys, case):
    with tarfile.open(x86_bundle) as tar:
        root = tar.getmembers()[0].name
        onnx = bytearray(tar.extractfile(f"{root}/onnx/model.onnx").read())
    onnx[len(onnx) // 2] ^= 0xFF
    replace, extra = {}, []
    if case == "altered-artifact":
        replace["onnx/model.onnx"] = bytes(onnx)
    elif case == "altered-run-script":
        replace["run.py"] = b"import os; os.system('echo pwned')\n"
    else:
        extra = [(member("ROOT/onnx/extra.onnx"), b"not listed anywhere")]
    altered = tmp_path / "altered.tar.gz"
    rewrite_bundle(x86_bundle, altered, replace=replace, extra=extra)
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    code, _, err = run_cli(capsys, "unpack", altered, sandbox / "dest")
    assert code == 4 and err.count("\n") == 1, err
    assert {"altered-artifact": "onnx/model.onnx", "altered-run-script": "run.py",
            "unlisted-file": "onnx/extra.onnx"}[case] in err
    assert_nothing_written(sandbox, tmp_path)
    code, out, err = run_cli(capsys, "verify", altered)
    assert code == 4 and "bundle-sha256" in out


def test_unpack_refuses_damaged_or_foreign_archives(x86_bundle, tmp_path, capsys):
    truncated = tmp_path / "truncated.tar.gz"
    truncated.write_bytes(x86_bundle.read_bytes()[: x86_bundle.stat().st_size // 2])
    foreign = tmp_path / "foreign.tar.gz"
    with tarfile.open(foreign, "w:gz") as tar:
        tar.addfile(member("notes/readme.txt"), io.BytesIO(b""))
    garbage = tmp_path / "garbage.tar.gz"
    garbage.write_bytes(b"this is not a tarball at all")
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    for path, needle in ((truncated, "damaged"), (foreign, "not an infc bundle"), (garbage, "not a readable"),
                         (tmp_path / "missing.tar.gz", "does not exist")):
        code, _, err = run_cli(capsys, "unpack", path, sandbox / "dest")
        assert code == 2 and needle in err and err.count("\n") == 1, err
    assert_nothing_written(sandbox, tmp_path)


def test_inside_symlinks_pass_the_safety_checks_but_must_be_listed(x86_bundle, tmp_path, capsys):
    # A link that stays inside is not unsafe; it still is not a file the manifest vouches for.
    linked = tmp_path / "linked.tar.gz"
    rewrite_bundle(x86_bundle, linked, extra=[(member("ROOT/onnx/alias.onnx", tarfile.SYMTYPE, "model.onnx"), None)])
    code, _, err = run_cli(capsys, "unpack", linked, tmp_path / "dest")
    assert code == 4 and "onnx/alias.onnx" in err


# --- the bundled build kit --------------------------------------------------------------------

def test_unpacked_jetson_kit_without_tensorrt_exits_3_naming_it(jetson_bundle, tmp_path):
    if importlib.util.find_spec("tensorrt") is not None:
        pytest.skip("TensorRT is installed here: the missing-TensorRT path cannot be shown")
    dest = tmp_path / "device"
    bundle_mod.unpack_bundle(jetson_bundle, dest)
    proc = subprocess.run([sys.executable, str(dest / "build_kit" / "build_engine.py")], cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 3, proc.stderr
    assert proc.stderr == f"build_engine: error: {build_engine.TRT_NOT_FOUND}\n"
    settings = json.loads((dest / "build_kit" / "builder_settings.json").read_text())
    assert settings["expected_tensorrt"] == "10.3" and settings["reference"]["outputs"] == "reference_outputs.npz"
