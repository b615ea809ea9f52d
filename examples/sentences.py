"""Real English sentences that ship with Python, and a small BERT sentence encoder trained on them.

No download: the sentences come from `pydoc_data.topics` (the Python
documentation's help topics, part of the standard library), split into
sentences of 6 to 40 words. A WordPiece tokenizer (HuggingFace `tokenizers`)
and a 4-layer BERT (hidden 128) are trained on them with masked-language
modelling; both are cached with the digits models (~/.cache/lowbit, or LOWBIT_CACHE).

`encoder()` gives a module (input_ids, attention_mask) -> mean-pooled,
L2-normalised sentence embeddings: the model a semantic-search user
quantizes. `batches(sentences, padded)` gives its inputs, padded to one
length or at each sentence's natural length.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
from digits import CACHE, save_to_cache

VOCAB = 2000
MAX_LEN = 64
STEPS = 1500


def sentences() -> list[str]:
    """The corpus: unique documentation sentences, in a fixed order."""
    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    out, seen = [], set()
    for s in re.split(r"(?<=[.!?])\s+", text):
        s = re.sub(r"\s+", " ", s).strip()
        if 6 <= len(s.split()) <= 40 and not re.search(r"[{}\[\]>]", s) and s not in seen:
            seen.add(s)
            out.append(s)
    return out


def tokenizer():
    """A WordPiece tokenizer trained on the corpus (cached)."""
    from tokenizers import BertWordPieceTokenizer, Tokenizer

    path = CACHE / f"sentences-wordpiece-{VOCAB}.json"
    if path.exists():
        return Tokenizer.from_file(str(path))
    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(sentences(), vocab_size=VOCAB, min_frequency=2)
    save_to_cache(path, lambda file: tok.save(str(file)))
    return Tokenizer.from_file(str(path))


def _config():
    import transformers as tf

    return tf.BertConfig(vocab_size=VOCAB, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=512, max_position_embeddings=MAX_LEN)


def encode(texts: list[str], padded: bool) -> list[dict[str, torch.Tensor]]:
    """One item per sentence: {"input_ids", "attention_mask"} of shape [1, L], L the natural length or MAX_LEN."""
    tok = tokenizer()
    pad_id = tok.token_to_id("[PAD]")
    items = []
    for text in texts:
        ids = tok.encode(text).ids[:MAX_LEN]
        mask = [1] * len(ids)
        if padded:
            ids, mask = ids + [pad_id] * (MAX_LEN - len(ids)), mask + [0] * (MAX_LEN - len(mask))
        items.append({"input_ids": torch.tensor([ids]), "attention_mask": torch.tensor([mask])})
    return items


def _train_mlm(model, items: list[dict], steps: int) -> None:
    tok = tokenizer()
    mask_id, pad_id = tok.token_to_id("[MASK]"), tok.token_to_id("[PAD]")
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps)
    ids_all = torch.cat([i["input_ids"] for i in items])
    model.train()
    for _ in range(steps):
        batch = ids_all[torch.randint(len(ids_all), (32,), generator=g)]
        labels = batch.clone()
        chosen = (torch.rand(batch.shape, generator=g) < 0.15) & (batch != pad_id)
        labels[~chosen] = -100
        inputs = batch.masked_fill(chosen, mask_id)
        loss = model(input_ids=inputs, attention_mask=(batch != pad_id).long(), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    model.eval()


class SentenceEncoder(nn.Module):
    """BERT + mean pooling over the real tokens + L2 normalisation."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return pooled / pooled.norm(dim=-1, keepdim=True).clamp(min=1e-6)


def encoder() -> SentenceEncoder:
    """The trained sentence encoder (trained once, about a minute on two cores, then from the cache)."""
    import transformers as tf

    path = CACHE / f"sentences-bert-v{VOCAB}-s{STEPS}.pt"
    torch.manual_seed(0)
    mlm = tf.BertForMaskedLM(_config())
    if path.exists():
        mlm.load_state_dict(torch.load(path, weights_only=True))
    else:
        _train_mlm(mlm, encode(sentences(), padded=True), STEPS)
        save_to_cache(path, lambda file: torch.save(mlm.state_dict(), file))
    return SentenceEncoder(mlm.bert).eval()
