"""The GPU session kit (benchmarks/gpu): the bundle builder on a fake wheel, the session's step runner
(timeouts, prerequisites, budget, its record), its bring-up, and its env and TBE steps run on the CPU."""

from __future__ import annotations

import json
import os
import struct
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest
from script_helpers import REPO, load_script

SLIM_TOOL = REPO.parent / "shared" / "gpu" / "slim_fatbin.py"
FATBIN_MAGIC = 0xBA55ED50


build_bundle = load_script("benchmarks/gpu/build_bundle.py")
gpu_session = load_script("benchmarks/gpu/session.py")


# ------------------------------------------------------------------------------------------ build_bundle


def fake_fatbin(payloads: dict[int, bytes]) -> bytes:
    """A shared library's bytes holding one CUDA fat binary container with an entry per arch."""
    entries = b"".join(struct.pack("<HHII", 2, 0, 32, len(p)) + bytes(16) + struct.pack("<I", sm) + p
                       for sm, p in payloads.items())
    return b"\x7fELF" + bytes(12) + struct.pack("<IHHQ", FATBIN_MAGIC, 1, 16, len(entries)) + entries + b"end"


def fat_size(data: bytes) -> int:
    pos = data.index(struct.pack("<I", FATBIN_MAGIC))
    return struct.unpack_from("<Q", data, pos + 8)[0]


def write_wheel(folder: Path, dist: str, version: str, module: str, tag: str = "py3-none-any",
                files: dict[str, bytes] | None = None) -> Path:
    """A minimal wheel that pip installs: one module plus dist-info."""
    path = folder / f"{dist}-{version}-{tag}.whl"
    info = f"{dist}-{version}.dist-info"
    contents = {f"{module}/__init__.py": b"", **(files or {}),
                f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n".encode(),
                f"{info}/WHEEL": f"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: {tag}\n".encode()}
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in contents.items():
            zf.writestr(name, data)
        zf.writestr(f"{info}/RECORD", "".join(f"{n},,\n" for n in [*contents, f"{info}/RECORD"]))
    return path


@pytest.fixture()
def fake_wheels(tmp_path):
    folder = tmp_path / "wheels"
    folder.mkdir()
    libs = {f"fbgemm_gpu/{name}": fake_fatbin({80: b"A" * 64, 90: b"B" * 48})
            for name in ("fbgemm_gpu_py.so", *build_bundle.UNUSED_DEVICE_CODE)}
    write_wheel(folder, "fbgemm_gpu", "1.6.0", "fbgemm_gpu", "cp312-cp312-manylinux_2_28_x86_64", libs)
    for pin in (*build_bundle.SMALL_WHEELS, *build_bundle.SOURCE_ONLY):
        dist, version = pin.split("==")
        write_wheel(folder, dist, version, gpu_session.WHEEL_MODULES[dist])
    return folder


@pytest.fixture()
def bundle(tmp_path, fake_wheels):
    if not SLIM_TOOL.is_file():
        pytest.skip(f"{SLIM_TOOL} (the shared folder beside the checkout) is not here")
    out = tmp_path / "bundle"
    assert build_bundle.main(["--wheels", str(fake_wheels), "--out", str(out), "--slim-tool", str(SLIM_TOOL)]) == 0
    return out


def test_bundle_keeps_one_arch_and_empties_the_unused_libraries(bundle, tmp_path):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["keep_sm"] == 90 and manifest["device_code_dropped_from"] == list(build_bundle.UNUSED_DEVICE_CODE)
    assert manifest["bundle_bytes"] + manifest["repo_tracked_bytes"] <= build_bundle.JOB_LIMIT_BYTES
    small = len(build_bundle.SMALL_WHEELS) + len(build_bundle.SOURCE_ONLY)
    assert len(list((bundle / "wheels").glob("*.whl"))) == small
    unpacked = tmp_path / "unpacked"
    with tarfile.open(bundle / "fbgemm_gpu.tar.xz") as tar:
        tar.extractall(unpacked, filter="data")
    kept = (unpacked / "fbgemm_gpu" / "fbgemm_gpu_py.so").read_bytes()
    assert fat_size(kept) == 32 + 48 and b"B" * 48 in kept and b"A" * 64 not in kept
    for name in build_bundle.UNUSED_DEVICE_CODE:
        emptied = (unpacked / "fbgemm_gpu" / name).read_bytes()
        assert fat_size(emptied) == 0 and b"A" * 64 not in emptied and b"B" * 48 not in emptied
    assert (unpacked / "fbgemm_gpu-1.6.0.dist-info" / "METADATA").is_file()


def test_bundle_refuses_a_wheel_without_a_library_it_must_empty(fake_wheels, tmp_path):
    if not SLIM_TOOL.is_file():
        pytest.skip(f"{SLIM_TOOL} is not here")
    wheel = next(fake_wheels.glob("fbgemm_gpu-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        files = {n: zf.read(n) for n in zf.namelist() if not n.endswith(build_bundle.UNUSED_DEVICE_CODE[0])}
    with zipfile.ZipFile(wheel, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    with pytest.raises(FileNotFoundError, match=build_bundle.UNUSED_DEVICE_CODE[0]):
        build_bundle.main(["--wheels", str(fake_wheels), "--out", str(tmp_path / "b"), "--slim-tool", str(SLIM_TOOL)])


# --------------------------------------------------------------------------------------- session: runner


def make_session(tmp_path, budget_s: float = 60.0, **kw) -> "gpu_session.Session":
    defaults = dict(out=tmp_path / "out", work=tmp_path / "work", site=None, bundle=tmp_path / "bundle",
                    python=sys.executable, device="cpu", budget_s=budget_s, train_impressions=1000,
                    test_impressions=1000)
    return gpu_session.Session(**{**defaults, **kw})


def py(code: str) -> list[list[str]]:
    return [[sys.executable, "-c", code]]


def test_steps_run_in_order_and_record_their_status(tmp_path, capsys):
    session = make_session(tmp_path)
    steps = [
        gpu_session.Step("good", 30, argv=lambda s: py("print('fine')"),
                         collect=lambda s: {"summary": "a figure"}),
        gpu_session.Step("bad", 30, argv=lambda s: py("import sys; print('boom'); sys.exit(3)")),
        gpu_session.Step("after_bad", 30, argv=lambda s: py("pass"), needs=("bad",)),
        gpu_session.Step("after_good", 30, argv=lambda s: py("pass"), needs=("good",)),
        gpu_session.Step("raises", 30, call=lambda s, log: 1 / 0),
    ]
    report = gpu_session.run_steps(steps, session)
    status = {name: entry["status"] for name, entry in report["steps"].items()}
    assert status == {"good": "ok", "bad": "failed", "after_bad": "skipped", "after_good": "ok", "raises": "failed"}
    assert report["steps"]["good"]["summary"] == "a figure"
    assert report["steps"]["bad"]["rc"] == 3 and report["steps"]["after_bad"]["why"] == "needs bad"
    assert "ZeroDivisionError" in report["steps"]["raises"]["error"]
    assert json.loads((session.out / "session.json").read_text()) == report
    assert "fine" in (session.out / "logs" / "good.log").read_text()
    printed = capsys.readouterr().out
    assert "[bad] failed" in printed and "    boom" in printed  # a failed step's log tail is printed


def test_a_step_over_its_time_is_killed_with_its_children(tmp_path):
    session = make_session(tmp_path)
    pid_file = tmp_path / "grandchild.pid"
    # The grandchild stands in for torchrun's workers: the whole process group must go.
    code = (f"import subprocess, time; p = subprocess.Popen(['sleep', '60']); "
            f"open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(60)")
    start = time.monotonic()
    report = gpu_session.run_steps([gpu_session.Step("slow", 8, argv=lambda s: py(code))], session)
    assert report["steps"]["slow"]["status"] == "timeout" and time.monotonic() - start < 30
    grandchild = int(pid_file.read_text())
    time.sleep(0.2)
    assert not Path(f"/proc/{grandchild}").exists() or "Z" in Path(f"/proc/{grandchild}/stat").read_text().split()[2]


def test_steps_beyond_the_budget_are_skipped(tmp_path):
    session = make_session(tmp_path, budget_s=100.0)

    def spend_the_budget(s, log):  # the session's clock, moved on as a long step would
        s.started -= 95.0
        return {}

    steps = [gpu_session.Step("first", 30, call=spend_the_budget),
             gpu_session.Step("second", 30, argv=lambda s: py("pass"))]
    report = gpu_session.run_steps(steps, session, min_step_s=10.0)
    assert report["steps"]["first"]["status"] == "ok"
    second = report["steps"]["second"]
    assert second["status"] == "skipped" and second["why"].startswith("budget") and "seconds" not in second


def test_only_the_wheels_the_machine_lacks_are_installed(tmp_path):
    wheels = [tmp_path / "torchrec-1.6.1-py312-none-any.whl", tmp_path / "packaging-25.0-py3-none-any.whl"]
    assert gpu_session.wheels_to_install(wheels, lambda m: m == "packaging") == wheels[:1]
    with pytest.raises(ValueError, match="not a wheel the bundle"):
        gpu_session.wheels_to_install([tmp_path / "requests-2.0-py3-none-any.whl"], lambda m: False)


def test_bring_up_unpacks_the_bundle_once(bundle, tmp_path):
    session = make_session(tmp_path, site=tmp_path / "site", bundle=bundle)
    log = tmp_path / "bringup.log"
    first = gpu_session.bring_up(session, log, importable=lambda module: module != "pyvers")
    assert first["installed"] == ["pyvers"]
    assert (session.site / "fbgemm_gpu" / "fbgemm_gpu_py.so").is_file()
    assert (session.site / "pyvers" / "__init__.py").is_file() and not (session.site / "torchrec").exists()
    again = gpu_session.bring_up(session, log, importable=lambda module: False)
    assert "already holds this bundle" in again["summary"] and not (session.site / "torchrec").exists()


# ----------------------------------------------------------------------------------- session: on the CPU


def test_session_refuses_the_cpu_unless_asked(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    with pytest.raises(SystemExit) as e:
        gpu_session.main(["--out", str(tmp_path / "out"), "--no-bundle"])
    assert e.value.code == 2


def test_env_and_tbe_steps_on_the_cpu(tmp_path):
    out = tmp_path / "out"
    rc = gpu_session.main(["--out", str(out), "--work", str(tmp_path / "work"), "--no-bundle", "--allow-cpu",
                           "--only", "env,tbe"])
    report = json.loads((out / "session.json").read_text())
    assert rc == 0, report
    assert [e["status"] for e in report["steps"].values()] == ["ok", "ok"]
    assert sorted(p.name for p in out.iterdir()) == ["session.json", "session.tar.gz"]  # what the tool brings back
    import tarfile

    with tarfile.open(out / "session.tar.gz") as tar:
        tar.extractall(tmp_path / "back", filter="data")
    out = tmp_path / "back"
    env = json.loads((out / "env.json").read_text())
    import torch
    import torchrec

    assert env["torch"] == torch.__version__ and env["torchrec"] == torchrec.__version__
    tbe = json.loads((out / "tbe.json").read_text())
    assert tbe["correctness"]["ok"] and tbe["correctness"]["rows_updated"] > 0
    assert tbe["timing"]["impressions_per_s"] > 0 and os.path.getsize(out / "logs" / "tbe.log") > 0


def test_pytest_counts_are_read_from_its_junit_xml(tmp_path):
    xml = tmp_path / "suite.xml"
    xml.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest" errors="1" failures="2" skipped="3" '
                   'tests="10" time="1.0"></testsuite></testsuites>')
    counts = gpu_session._junit(xml)
    assert (counts["tests"], counts["failures"], counts["errors"], counts["skipped"]) == (10, 2, 1, 3)
    assert counts["summary"] == "4 passed, 3 skipped, 2 failed, 1 errors"


def test_training_step_reads_in_process_when_shared_memory_is_short(tmp_path):
    assert gpu_session.train_workers(str(tmp_path), need_bytes=1) == 2
    assert gpu_session.train_workers(str(tmp_path), need_bytes=1 << 62) == 0
    assert gpu_session.train_workers(str(tmp_path / "missing")) == 0


def test_a_rerun_starts_its_step_from_empty_folders(tmp_path):
    session = make_session(tmp_path)
    (session.work / "run_train" / "checkpoints").mkdir(parents=True)
    step = gpu_session.Step("train", 30, call=lambda s, log: {"left": sorted(p.name for p in s.work.iterdir())},
                            fresh=("run_train",))
    assert gpu_session.run_steps([step], session)["steps"]["train"]["left"] == []


@pytest.mark.parametrize("profiled, device", [(True, True), (True, False), (False, False)])
def test_the_training_step_brings_back_its_profile_window(tmp_path, profiled, device):
    session = make_session(tmp_path)
    train = next(step for step in gpu_session.default_steps(sys.executable) if step.name == "train")
    assert "profile.steps=10" in train.argv(session)[0]
    run = session.work / "run_train"
    (run / "profile").mkdir(parents=True)
    session.out.mkdir()
    report = {"trace": "rank0.pt.trace.json.gz", "global_steps": [21, 30], "steps": 10,
              "self_cpu_ms_per_step": 4.2, "operators": []}
    if device:
        report["self_device_ms_per_step"] = 3.1
    (run / "profile" / "rank0_operators.json").write_text(json.dumps(report))
    (run / "profile" / "rank0.pt.trace.json.gz").write_bytes(b"trace")
    summary = {"train_samples_per_s": 1e6, "config": {"data": {"num_workers": 2}},
               "metrics": {"ctr/auc": 0.7, "ctr/logloss": 0.2}, "profile": report if profiled else None}
    (run / "summary.json").write_text(json.dumps(summary))
    text = gpu_session._collect_train(session)["summary"]
    assert text.startswith("1,000,000 samples/s with the reader (2 workers); ctr/auc 0.7000")
    assert ("steps 21-30 profiled: host 4.2 ms/step" in text) == profiled
    assert ("device 3.1 ms/step" in text) == device
    assert (session.out / "train_trace.json.gz").exists() == profiled
    if profiled:
        assert json.loads((session.out / "train_profile.json").read_text()) == report


def test_the_session_comes_back_as_two_files_rewritten_after_each_step(tmp_path):
    import tarfile

    delivered = tmp_path / "device_out"
    session = make_session(tmp_path, deliver=delivered)
    seen_after_first = []

    def second(s, log):
        with tarfile.open(delivered / "session.tar.gz") as tar:
            seen_after_first.extend(tar.getnames())
        (s.out / "figure.json").write_text("{}")
        return {}

    steps = [gpu_session.Step("first", 30, argv=lambda s: py("print('one')")),
             gpu_session.Step("second", 30, call=second)]
    report = gpu_session.run_steps(steps, session)
    assert sorted(seen_after_first) == ["logs/first.log", "session.json"]  # delivered before the next step ran
    assert sorted(p.name for p in delivered.iterdir()) == ["session.json", "session.tar.gz"]
    assert json.loads((delivered / "session.json").read_text()) == report
    with tarfile.open(delivered / "session.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["figure.json", "logs/first.log", "session.json"]
        assert b"one" in tar.extractfile("logs/first.log").read()


def test_files_past_the_size_limit_stay_out_and_are_named(tmp_path):
    import tarfile

    out = tmp_path / "out"
    (out / "logs").mkdir(parents=True)
    (out / "session.json").write_text("{}")
    (out / "logs" / "train.log").write_text("x" * 100)
    (out / "train_trace.json.gz").write_bytes(b"t" * 5000)
    left = gpu_session.deliver(out, tmp_path / "to", max_bytes=1000)
    assert left == ["train_trace.json.gz"]
    assert (tmp_path / "to" / "left_out.txt").read_text() == "train_trace.json.gz\n"
    with tarfile.open(tmp_path / "to" / "session.tar.gz") as tar:
        assert sorted(tar.getnames()) == ["logs/train.log", "session.json"]
    (out / "train_trace.json.gz").unlink()
    assert gpu_session.deliver(out, tmp_path / "to", max_bytes=1000) == []
    assert not (tmp_path / "to" / "left_out.txt").exists()
