"""Tiny models built offline for tests and benchmarks: no hub access, ever.

`build_tiny_bert` trains a WordPiece tokenizer on the spot and saves a 2-layer BERT as a
sentence-transformers directory (Transformer + mean Pooling). Deterministic for a given seed.
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

WORDS = (
    "how do i reset my password account login email billing invoice refund order shipping track "
    "package delivery cancel subscription plan upgrade downgrade price support contact phone chat "
    "hours open close store location return policy warranty repair device battery screen charge "
    "network wifi connect error update install app download sync backup restore data privacy "
    "security two factor code verify identity name address change profile settings language the "
    "a an is are to of in on for with my your what when where why which can does do not"
).split()


def corpus(n: int = 400, seed: int = 0) -> list[str]:
    import random

    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(n)]


def pairs(n: int = 64, seed: int = 0) -> list[dict[str, str]]:
    """Question/answer-like pairs that share words, so a ranking loss has signal."""
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = rng.sample(WORDS, 3)
        q = " ".join([*topic, *rng.sample(WORDS, 3)]) + f" q{i}"
        a = " ".join([*rng.sample(WORDS, 2), *topic, *rng.sample(WORDS, 2)])
        out.append({"question": q, "answer": a})
    return out


def build_tiny_bert(out_dir: str | Path, *, hidden: int = 32, layers: int = 2, seed: int = 0,
                    sentence_transformers: bool = True) -> Path:
    """Save a tiny BERT (and its tokenizer) to out_dir; as a sentence-transformers model by default."""
    import torch
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel, BertTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = out / "_tok"
    tok_dir.mkdir(exist_ok=True)
    wp = BertWordPieceTokenizer(lowercase=True)
    wp.train_from_iterator(corpus(), vocab_size=300, min_frequency=1,
                           special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    wp.save_model(str(tok_dir))
    # from_pretrained, not BertTokenizerFast(vocab_file=...): transformers 5 renamed that argument to
    # `vocab` and silently drops `vocab_file`, leaving a 5-token vocabulary that maps every word to [UNK].
    tokenizer = BertTokenizerFast.from_pretrained(str(tok_dir), do_lower_case=True)
    assert tokenizer.vocab_size > 100, f"tokenizer vocabulary too small: {tokenizer.vocab_size}"
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=hidden * 2, max_position_embeddings=64)
    model = BertModel(config)
    if not sentence_transformers:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    else:
        from sentence_transformers import SentenceTransformer, models

        hf_dir = out / "_hf"
        model.save_pretrained(hf_dir)
        tokenizer.save_pretrained(hf_dir)
        transformer = models.Transformer(str(hf_dir), max_seq_length=32)
        pooling = models.Pooling(transformer.get_embedding_dimension(), pooling_mode="mean")
        SentenceTransformer(modules=[transformer, pooling], device="cpu").save(str(out))
        import shutil

        shutil.rmtree(hf_dir)
    import shutil

    shutil.rmtree(tok_dir)
    return out
