"""GGUF base models in the calibration path, on a tiny GGUF written here with ``gguf.GGUFWriter``
from the tiny safetensors Llama of the other calibration tests (no download, no mocks):
transformers' GGUF loader must give the same weights (llama.cpp's q/k permutation undone) and the
same token ids as the directory, so adaptzip's loader, ``api.compress`` and the CLI give the same
numbers from either; a corrupt ``.gguf`` is a one-line BaseModelError naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from calib_fixtures import base_with_tokenizer, make_text, train_text_lora
from clihelp import run_json
from fixtures import one_torch_thread

from adaptzip import api, load_adapter
from adaptzip import calibrate as cb
from adaptzip.errors import BaseModelError
from adaptzip.options import CalibrationOptions

_one_thread = pytest.fixture(autouse=True)(one_torch_thread)

SEQ = 32


# ----------------------------------------------------------------------------- the GGUF writer
def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf ``LlamaModel.permute`` of q/k rows (HF rotate-half order to
    GGML's interleaved rope order); transformers' LlamaTensorProcessor undoes it on load."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(base_dir: Path, out: Path) -> Path:
    """The tiny Llama directory ``base_dir`` (config.json, model.safetensors, tokenizer.json with
    a Metaspace BPE) as an F32 GGUF at ``out``, with llama.cpp tensor names and the metadata
    transformers' GGUF loader reads (``integrations/gguf``, ``modeling_gguf_pytorch_utils``).

    The tokenizer is written as ``tokenizer.ggml.model = "llama"`` (sentencepiece-style): transformers
    builds a ``LlamaTokenizer`` from it — BPE + Metaspace(prepend always, split=False), exactly the
    Metaspace BPE of ``calib_fixtures.make_tokenizer`` (its split=False changes nothing: no merge
    here joins across words). The trainer's merges are written too (llama.cpp's own SPM files carry
    only scores, from which transformers rebuilds merges; -id scores reproduce these ids as well, but
    the explicit merges leave nothing to that reconstruction)."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((base_dir / "config.json").read_text())
    assert cfg["model_type"] == "llama", cfg["model_type"]
    sd = load_file(base_dir / "model.safetensors")
    tj = json.loads((base_dir / "tokenizer.json").read_text())
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head

    w = gguf.GGUFWriter(out, "llama")
    w.add_name("adaptzip tiny llama")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])

    vocab = tj["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens))) == list(range(cfg["vocab_size"]))
    specials = {a["content"] for a in tj["added_tokens"] if a["special"]}
    unk = tj["model"]["unk_token"]
    types = [
        gguf.TokenType.UNKNOWN if t == unk else gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL
        for t in tokens
    ]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(len(tokens))])
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_pad_token_id(cfg["pad_token_id"])
    w.add_unk_token_id(vocab[unk])
    w.add_add_bos_token(False)  # the directory tokenizer adds no special tokens either
    w.add_add_eos_token(False)

    def t(name: str, x: torch.Tensor) -> None:
        w.add_tensor(name, np.ascontiguousarray(x.float().numpy()))

    t("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        t(f"blk.{i}.attn_norm.weight", sd[p + "input_layernorm.weight"])
        t(f"blk.{i}.attn_q.weight", torch.from_numpy(_permute(sd[p + "self_attn.q_proj.weight"].numpy(), n_head)))
        t(f"blk.{i}.attn_k.weight", torch.from_numpy(_permute(sd[p + "self_attn.k_proj.weight"].numpy(), n_kv)))
        t(f"blk.{i}.attn_v.weight", sd[p + "self_attn.v_proj.weight"])
        t(f"blk.{i}.attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        t(f"blk.{i}.ffn_norm.weight", sd[p + "post_attention_layernorm.weight"])
        t(f"blk.{i}.ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
        t(f"blk.{i}.ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        t(f"blk.{i}.ffn_down.weight", sd[p + "mlp.down_proj.weight"])
    t("output_norm.weight", sd["model.norm.weight"])
    # transformers sets tie_word_embeddings from the absence of output.weight: write it when untied
    if not cfg.get("tie_word_embeddings", False):
        t("output.weight", sd["lm_head.weight"])

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def env(llama_base, tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    text = make_text(600, seed=0)
    (d / "calib.txt").write_text(text)
    (d / "eval.txt").write_text(make_text(100, seed=1))
    base = base_with_tokenizer(llama_base, d / "base", text)
    lora = train_text_lora(base, d / "lora", text, steps=20)
    (d / "gguf").mkdir()
    gg = write_llama_gguf(base, d / "gguf" / "tiny-llama-f32.gguf")
    return {"dir": d, "base": base, "lora": lora, "gguf": gg, "adapter": load_adapter(lora)}


# ----------------------------------------------------------------------------- tests
def test_gguf_base_same_model_and_tokens_as_directory(env):
    ad = env["adapter"]
    g = cb.load_base(env["gguf"], ad, "cpu")
    s = cb.load_base(env["base"], ad, "cpu")
    assert g.task == s.task == "lm" and g.vocab_size == s.vocab_size == 128
    assert g.model.base_model.model.config.tie_word_embeddings is False
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lg, ls = g.model(input_ids=ids).logits, s.model(input_ids=ids).logits  # base + source LoRA
        with g.model.disable_adapter(), s.model.disable_adapter():
            bg, bs = g.model(input_ids=ids).logits, s.model(input_ids=ids).logits
    assert torch.allclose(lg, ls, atol=1e-5, rtol=0), (lg - ls).abs().max()
    assert torch.allclose(bg, bs, atol=1e-5, rtol=0), (bg - bs).abs().max()
    assert not torch.allclose(lg, bg, atol=1e-3)  # the LoRA is attached on both sides

    docs = cb.read_texts(env["dir"] / "calib.txt")
    sentence = docs[0].split(". ")[0] + "."
    ig = g.tokenizer(sentence, add_special_tokens=False)["input_ids"]
    assert ig == s.tokenizer(sentence, add_special_tokens=False)["input_ids"] and len(ig) > 5
    assert g.tokenizer.unk_token_id not in ig
    assert g.tokenizer.decode(ig) == sentence
    # the whole calibration stream, EOS between documents included
    assert g.tokenizer.eos_token_id == s.tokenizer.eos_token_id == 2
    assert cb.tokenize_stream(g.tokenizer, docs) == cb.tokenize_stream(s.tokenizer, docs)


def test_compress_with_gguf_base_matches_directory_base(env, tmp_path):
    d = env["dir"]
    # budget 0.15, 20 steps: at 0.3 the svd start of this tiny LoRA is nearly exact (eval KL ~1e-6)
    # and distillation, early-stopped on the held-out split only, can move the eval KL either way
    common = dict(calib=d / "calib.txt", tokens=2000, eval_text=d / "eval.txt", seq_len=SEQ, steps=20, device="cpu")
    rg = api.compress(
        env["lora"],
        tmp_path / "g.safetensors",
        to="svd",
        budget=0.15,
        calibration=CalibrationOptions(base_model=env["gguf"], **common),
    ).metrics
    rs = api.compress(
        env["lora"],
        tmp_path / "s.safetensors",
        to="svd",
        budget=0.15,
        calibration=CalibrationOptions(base_model=env["base"], **common),
    ).metrics
    assert isinstance(rg["kl_before"], float) and isinstance(rg["kl_after"], float)
    assert rg["heldout_after"] <= rg["heldout_before"]  # the best state, the start included, is kept
    assert 0 < rg["kl_after"] <= rg["kl_before"]
    assert rg["kl_before"] == pytest.approx(rs["kl_before"], rel=1e-4)
    assert rg["kl_after"] == pytest.approx(rs["kl_after"], rel=1e-3)


def test_cli_compress_with_gguf_base(env, tmp_path):
    d = env["dir"]
    r = run_json(
        "compress",
        env["lora"],
        "-o",
        tmp_path / "c.safetensors",
        "--to",
        "svd",
        "--budget",
        "0.3",
        "--base-model",
        env["gguf"],
        "--calib",
        d / "calib.txt",
        "--calib-tokens",
        "2000",
        "--calib-steps",
        "0",
        "--device",
        "cpu",
    )
    assert r["output"] == str(tmp_path / "c.safetensors") and (tmp_path / "c.safetensors").is_file()
    assert r["kl_before"] > 0 and r["kl_after"] == r["kl_before"]  # no distillation steps


@pytest.mark.parametrize("kind", ["garbage", "truncated"])
def test_corrupt_gguf_is_a_one_line_base_model_error(env, tmp_path, kind):
    bad = tmp_path / "bad.gguf"
    if kind == "garbage":
        bad.write_bytes(b"this is not a GGUF file\n" * 40)
    else:  # a real header and metadata, the tensor data cut off
        data = env["gguf"].read_bytes()
        bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(BaseModelError, match="cannot read the model config") as e:
        cb.load_base(bad, env["adapter"], "cpu")
    msg = str(e.value)
    assert msg.startswith(f"{bad}: ") and "\n" not in msg, msg
    assert "cannot read the model config" in msg, msg  # adaptzip's cause, then transformers' first line
