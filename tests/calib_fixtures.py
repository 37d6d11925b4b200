"""Fixtures for calibration tests: a deterministic pseudo-English text, a small BPE tokenizer
trained offline on it (``tokenizers``, vocabulary ≤ 128 to fit the tiny test Llama), a copy of
the tiny base with that tokenizer saved beside it, and a PEFT LoRA trained on the text so that it
clearly lowers the base model's loss (the teacher differs from the base)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

ADJ = ["red", "small", "old", "quiet", "bright", "cold", "green", "tall"]
NOUN = ["cat", "dog", "river", "house", "tree", "bird", "road", "stone", "lamp", "door"]
VERB = ["sees", "finds", "likes", "moves", "holds", "keeps", "opens", "follows"]


def make_text(n_sentences: int, seed: int = 0) -> str:
    """Sentences from a tiny grammar, grouped into paragraphs of 6 (blank-line separated)."""
    rng = random.Random(seed)
    paras, cur = [], []
    for _ in range(n_sentences):
        a, b = rng.randrange(len(NOUN)), rng.randrange(len(NOUN))
        s = f"the {rng.choice(ADJ)} {NOUN[a]} {VERB[(a + b) % len(VERB)]} the {NOUN[b]} near the {NOUN[(a * 3 + 1) % len(NOUN)]}."
        cur.append(s)
        if len(cur) == 6:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return "\n\n".join(paras) + "\n"


def make_tokenizer(text: str, vocab: int = 128) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], show_progress=False
    )
    tok.train_from_iterator(text.split("\n"), trainer)
    assert tok.get_vocab_size() <= vocab
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def base_with_tokenizer(base: Path, out: Path, text: str) -> Path:
    """A copy of a tiny base model directory with a tokenizer trained on ``text``."""
    shutil.copytree(base, out)
    make_tokenizer(text).save_pretrained(out)
    return out


def train_text_lora(
    base: Path,
    out: Path,
    text: str,
    *,
    steps: int = 40,
    seed: int = 0,
    r: int = 8,
    seq_len: int = 32,
    lr: float = 1e-2,
    **kw,
) -> Path:
    """A LoRA (all linear modules) trained on the tokenised text: it lowers the loss clearly."""
    tok = AutoTokenizer.from_pretrained(base)
    ids = torch.tensor(tok(text.replace("\n", " "), add_special_tokens=False)["input_ids"])
    rows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(seed)
    cfg = {
        "r": r,
        "lora_alpha": 2 * r,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "task_type": "CAUSAL_LM",
        **kw,
    }
    pm = get_peft_model(model, LoraConfig(**cfg))
    opt = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        b = rows[torch.randint(len(rows), (8,), generator=g)]
        loss = pm(input_ids=b, labels=b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    pm.save_pretrained(out)
    return out
