"""Output safety, for real: a full disk (a 64 KiB tmpfs), a folder without write permission (root
without CAP_DAC_OVERRIDE), SIGTERM/SIGINT sent to the CLI while it writes, the umask's modes,
and nothing printed before the one error line. Every failure is one line naming the output and
its cause, with nothing left behind (no temporary file, no folder the command made)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from clihelp import run_cli, run_json
from fixtures import lora_key, make_base, write_adapter
from safetensors.torch import save_file

from adaptzip import container as ct
from adaptzip.errors import OutputError
from adaptzip.fileio import StreamingWriter, atomic_dir, atomic_file, check_output, save_tensors
from adaptzip.runtime import Interrupted, on_signals, shielded

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
CLI = [sys.executable, "-m", "adaptzip.cli"]


def _everything(d: Path) -> list[str]:
    """Every entry below ``d``, hidden ones included (temporary files start with a dot)."""
    return sorted(str(p.relative_to(d)) for p in d.rglob("*"))


def _one_error_line(code: int, out: str, err: str, expect: str, rc: int = 2) -> None:
    assert code == rc, err
    assert out == "" and err == f"adaptzip: error: {expect}\n", err


@pytest.fixture(scope="module")
def container(lora_fp32, tmp_path_factory) -> Path:
    """A lossless (--to lora) container of lora_fp32: 94 KB, and its expansions are larger still."""
    c = tmp_path_factory.mktemp("c") / "c.safetensors"
    run_json("compress", lora_fp32, "--to", "lora", "-o", c)
    return c


# ------------------------------------------------------------------ disk full
@pytest.fixture
def full_disk(tmp_path):
    """A 64 KiB tmpfs (mounting needs root): the test outputs do not fit in it."""
    d = tmp_path / "full"
    d.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("disk-full tests mount a 64 KiB tmpfs, which needs root")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(d)], capture_output=True, text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True)


@pytest.mark.parametrize("what", ["compress", "compress-masa", "peft", "dense", "merged"])
def test_disk_full_is_one_line_and_leaves_nothing(what, lora_fp32, llama_base, container, full_disk):
    before = {p.name: p.read_bytes() for p in lora_fp32.iterdir()}
    if what == "compress":
        out = full_disk / "new" / "sub" / "c.safetensors"  # folders made for the output go too
        args, named = ["compress", lora_fp32, "--to", "lora", "-o", out], out
    elif what == "compress-masa":  # 83 kB, after progress bars (which leave no blank line behind)
        out = full_disk / "c.safetensors"
        args, named = ["compress", lora_fp32, "--to", "masa", "-o", out], out
    elif what == "peft":
        out = full_disk / "p"
        args, named = ["expand", container, "-o", out], out / "adapter_model.safetensors"
    elif what == "dense":
        out = full_disk / "new" / "d.safetensors"
        args, named = ["expand", container, "--to", "dense", "-o", out], out
    else:
        out = full_disk / "m"
        args, named = (
            ["expand", container, "--to", "merged", "--base-model", llama_base, "-o", out],
            out / "model.safetensors",
        )
    code, stdout, stderr = run_cli(*args)
    _one_error_line(code, stdout, stderr, f"{named}: no space left on device")
    assert _everything(full_disk) == []
    assert {p.name: p.read_bytes() for p in lora_fp32.iterdir()} == before  # the input untouched
    ct.open_container(container).verify()


def test_disk_full_batch_fails_each_adapter(lora_fp32, full_disk, tmp_path):
    z = tmp_path / "zoo"
    for name in ("a", "b"):
        shutil.copytree(lora_fp32, z / name)
    code, stdout, stderr = run_cli("batch", z, "-o", full_disk / "out", "--jobs", "1", "--json")
    assert code == 1, stderr
    s = json.loads(stdout)
    assert s["counts"] == {"failed": 2}
    for r in s["adapters"]:
        assert r["error"] == "no space left on device" and r["error_path"] == str(
            full_disk / "out" / f"{r['adapter']}.safetensors"
        )
    # only the (small) summary and the lock: no container, no temporary file
    assert _everything(full_disk) == ["out", "out/.adaptzip-batch.lock", "out/batch.json", "out/batch.md"]


def test_disk_full_in_every_writer(full_disk):
    """The writers themselves: safetensors' save_file (SafetensorError), the streaming writer
    (OSError at write or close) and plain writes, in a file or a folder output."""
    big = {"w": torch.zeros(40_000)}  # 160 kB
    with pytest.raises(OutputError, match="no space left on device") as e, atomic_file(full_disk / "a.st") as tmp:
        save_file(big, str(tmp))
    assert e.value.path == str(full_disk / "a.st") and type(e.value.__cause__).__name__ == "SafetensorError"
    with pytest.raises(OutputError) as e, atomic_dir(full_disk / "new" / "d") as tmp:
        (tmp / "config.json").write_text("{}")
        save_tensors(tmp / "weights.safetensors", big)
    assert str(e.value) == f"{full_disk / 'new' / 'd' / 'weights.safetensors'}: no space left on device"
    with pytest.raises(OutputError, match="no space left on device"), atomic_file(full_disk / "s.st") as tmp:
        with StreamingWriter(tmp, [("w", torch.float32, (40_000,))]) as w:
            w.write("w", big["w"])
    with pytest.raises(OutputError, match="no space left on device"), atomic_file(full_disk / "t.txt") as tmp:
        tmp.write_bytes(b"x" * 200_000)
    src = full_disk.parent / "big.bin"  # a copy names its source first: the output is still named
    src.write_bytes(b"y" * 200_000)
    with pytest.raises(OutputError) as e, atomic_dir(full_disk / "m") as tmp:
        shutil.copy2(src, tmp / "big.bin")
    assert str(e.value) == f"{full_disk / 'm' / 'big.bin'}: no space left on device"
    assert _everything(full_disk) == []


# ------------------------------------------------------------------ permission denied
def _without_dac_override() -> list[str]:
    """A command prefix that runs without the power to write where permissions forbid it."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv"):
        return ["setpriv", "--inh-caps=-dac_override", "--bounding-set=-dac_override"]
    pytest.skip("running as root, and no setpriv to drop CAP_DAC_OVERRIDE")


_PERMISSION_SCRIPT = """
import json, sys
from pathlib import Path
from clihelp import run_cli
from adaptzip.errors import OutputError
from adaptzip.fileio import atomic_dir, atomic_file
lora, cont, ro = sys.argv[1:4]
res = [
    run_cli("compress", lora, "--to", "lora", "-o", f"{ro}/c.safetensors"),
    run_cli("expand", cont, "-o", f"{ro}/new/p"),
    run_cli("batch", str(Path(lora).parent), "-o", f"{ro}/b", "--jobs", "1"),
]
for writer, name in ((atomic_file, "f.safetensors"), (atomic_dir, "d")):  # past the early check
    try:
        with writer(Path(ro) / name):
            pass
        res.append("written")
    except OutputError as e:
        res.append(str(e))
print(json.dumps(res))
"""


def test_permission_denied_is_one_line(lora_fp32, container, tmp_path):
    prefix = _without_dac_override()
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        probe = subprocess.run([*prefix, "touch", str(ro / "probe")], capture_output=True)
        if probe.returncode == 0:
            pytest.skip("this user can write into a 0555 folder")
        p = subprocess.run(
            [*prefix, sys.executable, "-c", _PERMISSION_SCRIPT, str(lora_fp32), str(container), str(ro)],
            capture_output=True,
            text=True,
            env={**ENV, "PYTHONPATH": str(Path(__file__).parent)},
            timeout=300,
        )
    finally:
        ro.chmod(0o755)
    assert p.returncode == 0, p.stderr
    compress, expand, batch, writer_file, writer_dir = json.loads(p.stdout)
    why = f"permission denied (cannot write into folder {ro})"
    _one_error_line(*compress, f"{ro}/c.safetensors: {why}")
    _one_error_line(*expand, f"{ro}/new/p: {why}")
    _one_error_line(*batch, f"{ro}/b: {why}")
    assert writer_file == f"{ro}/f.safetensors: permission denied"
    assert writer_dir == f"{ro}/d: permission denied"
    assert _everything(ro) == []


def test_output_checks_before_any_work(lora_fp32, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    code, out, err = run_cli("compress", lora_fp32, "-o", f / "sub" / "c.safetensors")
    _one_error_line(code, out, err, f"{f}: is not a folder (the output {f / 'sub' / 'c.safetensors'} needs one there)")
    with pytest.raises(OutputError, match="is not a folder"):
        check_output(f / "x", force=False)
    with pytest.raises(OutputError, match="is not a folder"), atomic_file(f / "x"):
        pass
    assert f.read_text() == "x" and _everything(tmp_path) == ["afile"]


# ------------------------------------------------------------------ modes
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_outputs_get_the_umask_mode(umask, lora_fp32, llama_base, tmp_path):
    old = os.umask(umask)
    try:
        c = tmp_path / "c.safetensors"
        run_json("compress", lora_fp32, "--to", "svd", "--rank", "2", "-o", c)
        run_json("expand", c, "-o", tmp_path / "p")
        run_json("expand", c, "--to", "dense", "-o", tmp_path / "new" / "d.safetensors")
        run_json("expand", c, "--to", "merged", "--base-model", llama_base, "-o", tmp_path / "m")
    finally:
        os.umask(old)
    want_file, want_dir = 0o666 & ~umask, 0o777 & ~umask
    files = [c, *(tmp_path / "p").iterdir(), tmp_path / "new" / "d.safetensors", *(tmp_path / "m").iterdir()]
    assert len(files) == 7
    assert {f.name: oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {f.name: oct(want_file) for f in files}
    for d in (tmp_path / "p", tmp_path / "new", tmp_path / "m"):
        assert oct(stat.S_IMODE(d.stat().st_mode)) == oct(want_dir), d


# ------------------------------------------------------------------ signals
def test_signal_inside_a_write_removes_everything(tmp_path):
    """In-process: a real SIGTERM inside the write block unwinds it (Interrupted), the temporary
    file and the folders made for it go; inside a shielded section the signal waits for its end."""
    out = tmp_path / "new" / "sub" / "o.safetensors"
    with on_signals():
        with pytest.raises(Interrupted), atomic_file(out) as tmp:
            tmp.write_bytes(b"partial")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises long before
        assert _everything(tmp_path) == []
        done = []
        with pytest.raises(Interrupted), shielded():
            os.kill(os.getpid(), signal.SIGINT)
            done.append("after the signal")
        assert done == ["after the signal"]
        with atomic_dir(tmp_path / "d") as tmp:  # handlers still set, nothing pending: a normal write
            (tmp / "x").write_text("x")
    assert _everything(tmp_path) == ["d", "d/x"]


@pytest.fixture(scope="module")
def big_adapter(tmp_path_factory) -> Path:
    """A 12.6 MB adapter (12 modules 2048×2048, r=64): its lossless container takes a while to write."""
    g = torch.Generator().manual_seed(0)
    t = {}
    for i in range(6):
        for proj in ("up_proj", "down_proj"):
            m = f"model.layers.{i}.mlp.{proj}"
            t[lora_key(m, "A")] = torch.randn(64, 2048, generator=g) * 0.02
            t[lora_key(m, "B")] = torch.randn(2048, 64, generator=g) * 0.02
    cfg = {"r": 64, "lora_alpha": 64, "target_modules": ["up_proj", "down_proj"]}
    return write_adapter(tmp_path_factory.mktemp("big") / "big", t, cfg)


def _signal_when(args: list, root: Path, when: str, sig: int) -> tuple[subprocess.Popen, str, bool]:
    """Start the CLI, send ``sig`` once ``when`` is seen below ``root`` (``dir``: the output's new
    folder; ``tmp``: a temporary file or folder; ``out``: the output itself); returns the process,
    its stderr and whether the moment was seen (it may finish first)."""
    p = subprocess.Popen([*CLI, *map(str, args)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = False
    deadline = time.monotonic() + 120
    while p.poll() is None and time.monotonic() < deadline:
        names = [n for _, dirs, files in os.walk(root) for n in dirs + files]
        if (
            (when == "dir" and (root / "new").exists())
            or (when == "tmp" and any(n.startswith(".") and n.endswith(".tmp") for n in names))
            or (when == "out" and any(n in ("c.safetensors", "m") for n in names))
        ):
            p.send_signal(sig)
            seen = True
            break
        time.sleep(0.0005)
    _, err = p.communicate(timeout=120)
    return p, err, seen


def _console_script() -> list[str]:
    """The installed ``adaptzip`` console script (its entry point run directly when absent)."""
    exe = Path(sys.executable).parent / "adaptzip"
    if exe.is_file():
        return [str(exe)]
    return [sys.executable, "-c", "import sys; sys.argv[0] = 'adaptzip'; from adaptzip.entry import main; main()"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_the_cli_still_imports_is_one_line(sig, tmp_path):
    """Ctrl-C (or SIGTERM) in the first seconds, while torch is still importing: ``adaptzip:
    interrupted``, exit 130, nothing else (not a KeyboardInterrupt traceback, not a silent kill).
    The signal is sent as soon as torch's library is mapped, i.e. in the middle of its import;
    the adapter does not exist, so a signal that came too late would end in that error instead."""
    p = subprocess.Popen(
        [*_console_script(), "compress", str(tmp_path / "nope"), "-o", str(tmp_path / "c.safetensors")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    maps = Path(f"/proc/{p.pid}/maps")
    deadline = time.monotonic() + 60
    while p.poll() is None and time.monotonic() < deadline and "libtorch" not in maps.read_text():
        time.sleep(0.005)
    assert p.poll() is None, "the process ended before torch was imported"
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert (p.returncode, out, err.decode()) == (130, b"", "adaptzip: interrupted\n")
    assert _everything(tmp_path) == []


@pytest.mark.parametrize(
    "what,when,sig",
    [
        ("compress", "dir", signal.SIGINT),
        ("compress", "tmp", signal.SIGTERM),
        ("compress", "out", signal.SIGTERM),
        ("merged", "tmp", signal.SIGINT),
        ("merged", "tmp", signal.SIGTERM),
    ],
)
def test_signal_while_writing(what, when, sig, big_adapter, lora_fp32, tmp_path, tmp_path_factory):
    """SIGTERM/SIGINT to the CLI at several moments of its write: exit 130 after exactly
    ``adaptzip: interrupted``; no temporary file; the output is either absent (with no folder
    made for it) or complete."""
    root = tmp_path / "o"
    root.mkdir()
    if what == "compress":
        out = root / "new" / "sub" / "c.safetensors"
        args = ["compress", big_adapter, "--to", "lora", "-o", out]
    else:  # a 51 MB base (large vocabulary, lora_fp32's layer shapes): the merged write takes a while
        base = tmp_path_factory.getbasetemp() / "bigbase"
        if not base.exists():
            make_base(base, vocab=100_000)
        c = tmp_path / "c.safetensors"
        run_json("compress", lora_fp32, "--to", "svd", "--rank", "2", "-o", c)
        out = root / "new" / "sub" / "m"
        args = ["expand", c, "--to", "merged", "--base-model", base, "-o", out]
    for _ in range(3):  # on a busy machine the write may end before the moment is seen: again
        shutil.rmtree(root)
        root.mkdir()
        p, err, seen = _signal_when(args, root, when, sig)
        if seen:
            break
    assert seen, f"the moment {when!r} never came: {err}"
    left = _everything(root)
    assert not [n for n in left if Path(n).name.startswith(".")], left
    if when == "out":  # the output was renamed into place before the signal: it is whole
        assert p.returncode in (0, 130), err
        ct.open_container(out).verify()
        return
    assert p.returncode == 130, err
    assert err == "adaptzip: interrupted\n"
    if out.exists():  # the signal came after the rename: a whole output
        if what == "compress":
            ct.open_container(out).verify()
        else:
            assert (out / "model.safetensors").stat().st_size == (base / "model.safetensors").stat().st_size
    else:
        assert left == [], left  # and no folder made for it


# ------------------------------------------------------------------ nothing before the error
def test_nothing_printed_before_the_error(lora_fp32, llama_base, tmp_path):
    """transformers' "Loading weights" bar and its warnings stay quiet on the way to an error
    (the tiny base has no tokenizer); a tokenizer error keeps its whole cause on one line."""
    text = tmp_path / "t.txt"
    text.write_text("\n\n".join("the cat sat on the mat " * 20 for _ in range(20)))
    args = ["compress", lora_fp32, "-o", tmp_path / "c.safetensors", "--base-model", llama_base, "--calib", text]
    p = subprocess.run([*CLI, *map(str, args)], env=ENV, capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stdout == ""
    assert p.stderr == (
        f"adaptzip: error: {llama_base}: no usable tokenizer (calibration needs the base model's tokenizer): "
        "the folder has no tokenizer files (tokenizer.json, tokenizer_config.json, tokenizer.model, ...)\n"
    )
    # a tokenizer config that transformers cannot build: its multi-line cause, joined
    base = tmp_path / "base"
    shutil.copytree(llama_base, base)
    (base / "tokenizer_config.json").write_text('{"tokenizer_class": "NoSuchTokenizerFast"}')
    code, out, err = run_cli(*args[:4], "--base-model", base, "--calib", text)
    assert code == 2 and out == "" and len(err.splitlines()) == 1, err
    assert err.startswith(f"adaptzip: error: {base}: no usable tokenizer"), err
    assert not (tmp_path / "c.safetensors").exists()


def test_first_line_keeps_the_cause():
    from adaptzip.calibrate import _first_line

    e = ValueError(
        "Couldn't instantiate the backend tokenizer from one of: \n(1) a file, \n(2) a class. \nYou need sentencepiece."
    )
    assert (
        _first_line(e)
        == "ValueError: Couldn't instantiate the backend tokenizer from one of: (1) a file, (2) a class. You need sentencepiece."
    )
    long = _first_line(RuntimeError("word " * 200))
    assert len(long) <= len("RuntimeError: ") + 402 and long.endswith(" …")
