"""``adaptzip batch --executor ray`` on a real local Ray cluster (``ray start --head``, one per
module): the tasks run in the cluster's own worker processes, and those see none of the driver's
files. Every zoo and OUT_DIR of this module lives below one folder, and the workers start with
an audit hook (``sitecustomize`` on the cluster's PYTHONPATH) that refuses them, and logs, any
opening or listing of a path below it. So a conversion that read a source or wrote an output
through the driver's paths would fail here, as it would on a cluster whose nodes see other disks."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from clihelp import run_cli
from fixtures import lora_key, one_torch_thread, tiny_llama_adapter
from safetensors.torch import load_file, save_file

from adaptzip import container as ct
from adaptzip import zoo
from adaptzip.options import CalibrationOptions

ray = pytest.importorskip(
    "ray", reason="ray is not installed (pip install 'adaptzip[ray]'): the Ray executor is untested"
)

one_thread = pytest.fixture(scope="module", autouse=True)(one_torch_thread)

FORBID_ENV = "ADAPTZIP_TEST_DRIVER_ROOT"
LOG_ENV = "ADAPTZIP_TEST_VIOLATIONS"
# Imported at the start of every Python process of the cluster (its workers included).
SITECUSTOMIZE = f'''
import os, sys

_ROOT = os.environ.get("{FORBID_ENV}")
if _ROOT:
    _ROOT = os.path.realpath(_ROOT).rstrip(os.sep) + os.sep
    _LOG = os.open(os.environ["{LOG_ENV}"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _no_driver_paths(event, args):
        if event not in ("open", "os.listdir", "os.scandir") or not args or not isinstance(args[0], (str, bytes, os.PathLike)):
            return
        p = os.path.abspath(os.fsdecode(args[0]))
        if (p + os.sep).startswith(_ROOT) or (os.path.realpath(p) + os.sep).startswith(_ROOT):
            os.write(_LOG, f"{{os.getpid()}} {{event}} {{p}}\\n".encode())
            raise PermissionError(13, "a Ray worker opened a path of the driver", p)

    sys.addaudithook(_no_driver_paths)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    """The live processes of session ``sid`` (Linux)."""
    pids = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = Path(f"/proc/{d}/stat").read_text()
            except OSError:
                continue
            state, _ppid, _pgrp, session = stat[stat.rindex(")") + 2 :].split()[:4]
            if int(session) == sid and state != "Z":  # a zombie is dead already (its reaper may be gone)
                pids.append(int(d))
    return pids


def _stop_cluster(proc: subprocess.Popen) -> None:
    """Kill every process of our cluster, and only those. ``ray start`` ran as the leader of a
    session of its own, and every process of the cluster (workers included) is in it: ``ray
    stop`` would stop every Ray cluster of this machine, and a polite ``ray start --block``
    shutdown takes ~30 s."""
    if not os.path.isdir("/proc"):  # not Linux: the leader's process group (the workers die with the raylet)
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
    for _ in range(50 if os.path.isdir("/proc") else 0):
        pids = _session_pids(proc.pid)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.1)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def start_cluster(ray_tmp: Path, extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """``ray start --head --block`` on a free port of 127.0.0.1 with 2 CPUs, temp folder
    ``ray_tmp``, in a session of its own (so that :func:`_stop_cluster` stops exactly it), with
    ``extra_env``; returns the process and the address once the cluster runs (RuntimeError with
    its log when it does not start). Also used by ``bench/bench_zoo.py --ray``."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", **(extra_env or {})})
    ray_bin = Path(sys.executable).parent / "ray"
    cmd = [
        str(ray_bin) if ray_bin.exists() else "ray",
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--port",
        str(port),
        "--num-cpus",
        "2",
        "--disable-usage-stats",
        "--include-dashboard=false",
        "--temp-dir",
        str(ray_tmp),
        "--object-store-memory",
        str(100 << 20),
    ]
    log_path = ray_tmp / "ray-start.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            cwd=ray_tmp,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + 180
    while "Ray runtime started" not in log_path.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            _stop_cluster(proc)
            raise RuntimeError(f"ray start failed:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.2)
    return proc, f"127.0.0.1:{port}"


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory) -> Iterator[dict]:
    """A one-node Ray cluster of 2 CPUs on 127.0.0.1, in a session of its own, torn down after
    the module (also when a test fails). Yields its ``address``, the driver's ``root`` folder
    (the workers may not open anything below it), the ``violations`` log of the hook and the
    workers' temporary folder ``worker_tmp``."""
    root = tmp_path_factory.mktemp("driver")
    ray_tmp = Path(tempfile.mkdtemp(prefix="azray", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes
    site = ray_tmp / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    violations = ray_tmp / "violations.log"
    worker_tmp = ray_tmp / "tmp"  # the workers' TMPDIR: where each task makes its folder
    worker_tmp.mkdir()
    extra = {
        "PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p),
        FORBID_ENV: str(root),
        LOG_ENV: str(violations),
        "TMPDIR": str(worker_tmp),
    }
    try:
        proc, address = start_cluster(ray_tmp, extra)
    except RuntimeError as e:
        shutil.rmtree(ray_tmp, ignore_errors=True)
        pytest.fail(str(e))
    try:
        yield {"address": address, "root": root, "violations": violations, "worker_tmp": worker_tmp}
    finally:
        _stop_cluster(proc)
        shutil.rmtree(ray_tmp, ignore_errors=True)


@pytest.fixture
def on_cluster(ray_cluster, monkeypatch) -> Iterator[dict]:
    """The cluster, chosen the documented way: RAY_ADDRESS (adaptzip calls ``ray.init()``). After
    the test: no worker opened a path below the driver's folder, and every task's temporary
    folder is gone (also those of cancelled tasks)."""
    monkeypatch.setenv("RAY_ADDRESS", ray_cluster["address"])
    assert not ray.is_initialized()
    yield ray_cluster
    assert not ray.is_initialized()  # adaptzip disconnected from the cluster it connected to
    log = ray_cluster["violations"]
    assert not log.exists() or log.read_text() == "", f"a Ray worker opened the driver's files:\n{log.read_text()}"
    assert not list(ray_cluster["worker_tmp"].glob("adaptzip-ray-*"))  # every task removed its folder


def _zoo(root: Path) -> Path:
    """3 good synthetic adapters (one nested), one with a truncated weights file (refused by the
    driver, which checks every adapter before shipping it) and one with a NaN (refused inside
    the task, by the conversion)."""
    z = root / "zoo"
    for rel, seed in (("a", 0), ("team/b", 1), ("c", 2), ("trunc", 3), ("nan", 4)):
        tiny_llama_adapter(z / rel, seed=seed, layers=2, targets=("q_proj", "v_proj"))
    w = z / "trunc" / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-100])
    w = z / "nan" / "adapter_model.safetensors"
    t = load_file(w)
    t[lora_key("model.layers.1.self_attn.v_proj", "B")][0, 0] = float("nan")
    save_file(t, w)
    return z


def _batch(*args) -> tuple[int, dict, str]:
    code, stdout, stderr = run_cli("batch", *args, "--to", "svd", "--budget", "0.25", "--json")
    return code, json.loads(stdout), stderr


def test_ray_batch_is_the_local_batch(on_cluster):
    """Same containers byte for byte as ``--jobs 1``, the bad adapters fail alone with the same
    one-line errors naming the driver's files, and a rerun skips everything."""
    work = Path(tempfile.mkdtemp(dir=on_cluster["root"]))
    z = _zoo(work)
    local, far = work / "local", work / "far"
    same = {"to": "svd", "budget": 0.25, "command": "adaptzip batch zoo"}  # the manifest records the command
    s_local = zoo.batch(z, local, jobs=1, **same)
    s = zoo.batch(z, far, executor="ray", jobs=2, **same)
    assert s["executor"] == "ray" and not s["interrupted"]
    assert s["counts"] == s_local["counts"] == {"converted": 3, "failed": 2}
    rows, rows_local = ({r["adapter"]: r for r in x["adapters"]} for x in (s, s_local))
    # the failures: the same one-line errors, naming the file at fault on the driver's disk
    assert "NaN" in rows["nan"]["error"] and "truncated" in rows["trunc"]["error"]
    for a in ("nan", "trunc"):
        assert rows[a]["status"] == "failed" and rows[a]["source"] == str(z / a)
        assert rows[a]["error"] == rows_local[a]["error"]
        assert rows[a]["error_path"] == rows_local[a]["error_path"] == str(z / a / "adapter_model.safetensors")
    # the good ones: byte-identical containers, the same rows
    written = sorted(p.relative_to(far).as_posix() for p in far.rglob("*.safetensors"))
    assert written == ["a.safetensors", "c.safetensors", "team/b.safetensors"]
    for rel in ("a", "team/b", "c"):
        r = rows[rel]
        assert r["status"] == "converted" and r["source"] == str(z / rel)
        assert (far / r["output"]).read_bytes() == (local / r["output"]).read_bytes(), rel
        for k in ("output", "form", "bytes", "source_bytes", "ratio", "rel_error", "svd_baseline_rel_error", "group"):
            assert r[k] == rows_local[rel][k], (rel, k)
        ct.open_container(far / r["output"]).verify()
    assert json.loads((far / "batch.json").read_text())["counts"] == s["counts"]
    assert not list(far.rglob("*.tmp"))

    # the rerun, from the CLI: every container is up to date (checked by the driver: no task) and
    # untouched; stderr holds one house error line per failed adapter
    mtimes = {p: p.stat().st_mtime_ns for p in far.rglob("*.safetensors")}
    code, s2, err2 = _batch(z, "-o", far, "--executor", "ray")
    assert code == 1 and s2["counts"] == {"skipped": 3, "failed": 2}, err2
    assert sorted(err2.splitlines()) == [
        f"adaptzip: error: {z / a / 'adapter_model.safetensors'}: {rows[a]['error']}" for a in ("nan", "trunc")
    ]
    assert {p: p.stat().st_mtime_ns for p in far.rglob("*.safetensors")} == mtimes


def test_the_workers_cannot_open_the_drivers_files(ray_cluster):
    """The check of every other test is real: a task that opens a file below the driver's folder
    fails, and the hook logs it (each test's teardown asserts that the log is empty)."""
    secret = ray_cluster["root"] / "secret.txt"
    secret.write_text("only the driver reads this")
    ray.init(address=ray_cluster["address"], log_to_driver=False, logging_level="WARNING")
    try:
        probe = ray.remote(num_cpus=1)(lambda p: open(p).read())
        with pytest.raises(ray.exceptions.RayTaskError, match="opened a path of the driver"):
            ray.get(probe.remote(str(secret)))
        assert ray.get(ray.remote(num_cpus=1)(lambda: os.getcwd()).remote()) != os.getcwd()
    finally:
        ray.shutdown()
    assert str(secret) in ray_cluster["violations"].read_text()
    ray_cluster["violations"].write_text("")


def test_ray_calibration_reads_the_base_model_on_the_node(on_cluster, llama_base, tmp_path):
    """Calibration on Ray: the base model and the text are read from the node's own disk (the
    same absolute path as on the driver; outside the driver's folder here), and the Σ file
    written beside the container comes back with it. The same tensors, manifest and Σ file as
    ``--jobs 1``."""
    from calib_fixtures import base_with_tokenizer, make_text

    work = Path(tempfile.mkdtemp(dir=on_cluster["root"]))
    z = work / "zoo"
    tiny_llama_adapter(z / "a", seed=5, layers=3, targets=("q_proj", "v_proj"))
    text = make_text(300)
    (tmp_path / "calib.txt").write_text(text)
    base = base_with_tokenizer(llama_base, tmp_path / "base", text)
    cal = CalibrationOptions(base_model=base, calib=tmp_path / "calib.txt", tokens=1500, steps=3, seq_len=32)
    same = {"to": "svd", "budget": 0.4, "calibration": cal, "command": "adaptzip batch zoo"}
    s_local = zoo.batch(z, work / "local", jobs=1, **same)
    s = zoo.batch(z, work / "far", executor="ray", jobs=1, **same)
    assert s["counts"] == s_local["counts"] == {"converted": 1}, s["adapters"]
    # a calibrated manifest records its timings: everything else is the same, the tensors too
    far, local = (ct.open_container(work / w / "a.safetensors") for w in ("far", "local"))
    assert far.manifest["payload_sha256"] == local.manifest["payload_sha256"]

    def untimed(m: dict) -> dict:
        return {**m, "metrics": {k: v for k, v in m["metrics"].items() if not k.endswith(("_seconds", "_per_s"))}}

    assert untimed(far.manifest) == untimed(local.manifest)
    assert (work / "far" / "a.stats.safetensors").read_bytes() == (work / "local" / "a.stats.safetensors").read_bytes()
    assert "kl_after" in far.manifest["metrics"]
    assert sorted(p.name for p in (work / "far").iterdir() if not p.name.startswith(".")) == [
        "a.safetensors",
        "a.stats.safetensors",
        "batch.json",
        "batch.md",
    ]


def test_ray_calibration_needs_the_base_model_on_every_node(on_cluster, tmp_path):
    """A calibration path missing on a node refuses the batch before any work, with one line
    naming it (one tiny task per node checks)."""
    z = Path(tempfile.mkdtemp(dir=on_cluster["root"])) / "zoo"
    tiny_llama_adapter(z / "a", layers=1, targets=("q_proj",))
    text = tmp_path / "calib.txt"
    text.write_text("some calibration text\n\nmore of it\n")
    out = tmp_path / "out"
    missing = tmp_path / "no-such-model"
    code, stdout, err = run_cli(
        "batch", z, "-o", out, "--executor", "ray", "--base-model", missing, "--calib", text, "--to", "lora"
    )
    assert code == 2 and stdout == "", err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"adaptzip: error: {missing}: no such file or folder on Ray node ")
    assert "every node" in lines[0]
    assert not out.exists()  # refused before anything was written


def test_ray_unreachable_cluster_is_one_line(tmp_path, monkeypatch):
    """A RAY_ADDRESS where no cluster listens: one line and exit 2 at once (``ray.init`` alone
    would retry for minutes), and no output folder."""
    z = tmp_path / "zoo"
    tiny_llama_adapter(z / "a", layers=1, targets=("q_proj",))
    addr = f"127.0.0.1:{_free_port()}"
    monkeypatch.setenv("RAY_ADDRESS", addr)
    t0 = time.monotonic()
    code, stdout, err = run_cli("batch", z, "-o", tmp_path / "out", "--executor", "ray", "--to", "lora")
    assert code == 2 and stdout == "" and time.monotonic() - t0 < 30, err
    assert (
        err
        == f"adaptzip: error: --executor ray: cannot reach the Ray cluster at RAY_ADDRESS={addr}: connection refused\n"
    )
    assert not (tmp_path / "out").exists() and not ray.is_initialized()


def test_ray_batch_interrupted_then_finished(on_cluster):
    """SIGTERM to the driver while its tasks run: no new task starts, the running ones are
    cancelled, only whole containers are in OUT_DIR, the summary is the disk, and a rerun
    converts the rest."""
    work = Path(tempfile.mkdtemp(dir=on_cluster["root"]))
    z = work / "zoo"
    for i in range(12):
        tiny_llama_adapter(z / f"ad{i:02d}", seed=i, layers=3)
    out = work / "out"
    sent: list[float] = []

    def containers() -> list[Path]:
        return list(out.rglob("*.safetensors")) if out.is_dir() else []

    def killer():
        deadline = time.monotonic() + 300
        while not sent and time.monotonic() < deadline:
            if containers():
                os.kill(os.getpid(), signal.SIGTERM)
                sent.append(time.monotonic())
            time.sleep(0.005)

    old = signal.signal(signal.SIGTERM, lambda *a: None)  # in case it lands after the batch ended
    try:
        t = threading.Thread(target=killer, daemon=True)
        t.start()
        s = zoo.batch(z, out, to="svd", budget=0.25, executor="ray", jobs=1)
        sent.append(0)
        t.join()
    finally:
        signal.signal(signal.SIGTERM, old)
    done = containers()
    assert s["interrupted"] is True and 1 <= len(done) < 12, s["counts"]
    assert s["counts"] == {"converted": len(done), "interrupted": 12 - len(done)}
    rows = {r["adapter"]: r for r in s["adapters"]}
    for i in range(12):
        c = out / f"ad{i:02d}.safetensors"
        assert (rows[f"ad{i:02d}"]["status"] == "converted") == c.exists()
        if c.exists():
            ct.open_container(c).verify()
    assert not list(out.rglob("*.tmp"))
    first = {q: q.stat().st_mtime_ns for q in done}
    s = zoo.batch(z, out, to="svd", budget=0.25, executor="ray", jobs=2)
    assert s["interrupted"] is False and s["counts"] == {"converted": 12 - len(done), "skipped": len(done)}
    assert {q: q.stat().st_mtime_ns for q in first} == first
    assert len(containers()) == 12 and not list(out.rglob("*.tmp"))
