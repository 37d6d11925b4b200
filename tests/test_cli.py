"""The CLI: every command, --json on stdout, one-line errors with exit code 2."""

import json
import shutil
import subprocess
import sys

import pytest
from clihelp import RESULT_KEYS, run_cli, run_json


def test_end_to_end_commands(lora_fp32, llama_base, tmp_path):
    info = run_json("inspect", lora_fp32)
    assert info["n_modules"] == 21 and info["ranks"] == {"8": 21} and len(info["modules"]) == 21
    forms = run_json("forms")["forms"]
    names = {f["name"] for f in forms}
    assert {"lora", "svd"} <= names
    svd = next(f for f in forms if f["name"] == "svd")
    assert any(o["name"] == "rank" and o["help"] for o in svd["options"])
    same = run_json("compress", lora_fp32, "--to", "lora", "-o", tmp_path / "same.safetensors")
    assert same["rel_error"] == 0.0
    r = run_json("compress", lora_fp32, "--to", "svd", "--budget", "0.25", "-o", tmp_path / "small.safetensors")
    assert RESULT_KEYS <= r.keys(), RESULT_KEYS - r.keys()
    assert r["ratio"] <= 0.25 and 0 < r["rel_error"] < 1
    small = tmp_path / "small.safetensors"
    assert run_json("verify", small)["ok"] is True
    assert run_json("expand", small, "-o", tmp_path / "lora_out")["target"] == "peft"
    v = run_json("expand", small, "-o", tmp_path / "lora_vllm", "--target", "vllm", "--max-lora-rank", "64")
    assert v["max_lora_rank"] == 64
    assert run_json("expand", small, "-o", tmp_path / "delta.safetensors", "--to", "dense")["tensors"] == 21
    assert (
        run_json("expand", small, "-o", tmp_path / "merged", "--to", "merged", "--base-model", llama_base)[
            "edited_tensors"
        ]
        == 21
    )
    # human output goes to stderr, stdout stays empty
    code, out, err = run_cli("verify", small)
    assert code == 0 and out == "" and "ok" in err
    code, out, err = run_cli("compress", lora_fp32, "--to", "svd", "--rank", "2", "-o", tmp_path / "h.safetensors")
    assert code == 0 and out == "" and "svd baseline" in err


@pytest.mark.parametrize(
    "case",
    [
        "missing_dir",
        "no_config",
        "bad_type",
        "corrupt",
        "contradict",
        "bad_container",
        "exists",
        "bad_option",
        "bad_budget",
        "merged_no_base",
        "bad_choice",
    ],
)
def test_errors_are_one_line(case, lora_fp32, tmp_path):
    d = tmp_path / "ad"
    shutil.copytree(lora_fp32, d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    out = tmp_path / "out.safetensors"
    args = ["compress", d, "-o", out]
    if case == "missing_dir":
        args = ["compress", tmp_path / "nope", "-o", out]
        expect = "nope: no such directory"
    elif case == "no_config":
        (d / "adapter_config.json").unlink()
        expect = "no adapter_config.json"
    elif case == "bad_type":
        cfg = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
        expect = "peft_type 'IA3' is not supported"
    elif case == "corrupt":
        (d / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}xxxx")
        expect = "corrupt safetensors"
    elif case == "contradict":
        cfg = json.loads((d / "adapter_config.json").read_text())
        (d / "adapter_config.json").write_text(json.dumps({**cfg, "rank_pattern": {"q_proj": 4}}))
        expect = "tensors have rank 8 but adapter_config.json says r=4"
    elif case == "bad_container":
        (tmp_path / "c.safetensors").write_bytes(b"nonsense")
        args = ["verify", tmp_path / "c.safetensors"]
        expect = "not a readable safetensors file"
    elif case == "exists":
        out.write_bytes(b"keep")
        expect = "exists (use --force"
    elif case == "bad_option":
        args += ["--to", "svd", "--experts", "3"]
        expect = "form svd has no option 'experts'"
    elif case == "bad_budget":
        args += ["--budget", "lots"]
        expect = "expected a fraction like 0.25"
    elif case == "bad_choice":
        args += ["--dtype", "fp8"]
        expect = "Invalid value for '--dtype'"
    elif case == "merged_no_base":
        run_json("compress", d, "-o", out)
        args = ["expand", out, "-o", tmp_path / "m", "--to", "merged"]
        expect = "--to merged needs --base-model"
    code, stdout, stderr = run_cli(*args)
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("adaptzip: error: ") and expect in lines[0], stderr
    assert "Traceback" not in stderr and stdout == ""
    if case == "exists":
        assert out.read_bytes() == b"keep"
    elif case != "merged_no_base":
        assert not out.exists()
    if case not in ("no_config", "bad_type", "corrupt", "contradict"):
        assert {p.name: p.read_bytes() for p in d.iterdir()} == before  # input untouched


def test_debug_shows_traceback_and_console_script(tmp_path):
    exe = shutil.which("adaptzip") or str(__import__("pathlib").Path(sys.executable).parent / "adaptzip")
    p = subprocess.run([exe, "--debug", "inspect", str(tmp_path / "nope")], capture_output=True, text=True)
    assert p.returncode != 0 and "Traceback" in p.stderr
    p = subprocess.run([exe, "inspect", str(tmp_path / "nope")], capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.strip() == f"adaptzip: error: {tmp_path / 'nope'}: no such directory"
