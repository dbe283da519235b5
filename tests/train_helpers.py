"""A deterministic toy dataset with the pretraining data contract (set_epoch, skip), a collator and
a dummy loss, shared by tests/test_training_loop.py and the 2-process helper script."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, IterableDataset

from tiny import SLOTS, make_model, make_tokenizer


class ToyStream(IterableDataset):
    """n fixed examples of ``length`` word ids, two slot tokens and EOS; epoch e is a
    permutation seeded by (seed, e); skip(n) starts the next iteration at example n."""

    def __init__(self, tokenizer, n: int = 10, length: int = 8, seed: int = 0):
        g = torch.Generator().manual_seed(1234)
        slot_ids = tokenizer.convert_tokens_to_ids(SLOTS)
        first_word = 4
        last_word = min(slot_ids)  # the word-level vocabulary sits before the added slot tokens
        self.rows = []
        for i in range(n):
            words = torch.randint(first_word, last_word, (length,), generator=g)
            slots = torch.tensor([slot_ids[(2 * i) % 16], slot_ids[(2 * i + 1) % 16]])
            self.rows.append(torch.cat([words, slots, torch.tensor([tokenizer.eos_token_id])]))
        self.seed, self.epoch, self._skip = seed, 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self._skip = epoch, 0

    def skip(self, n: int) -> None:
        self._skip = n

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self):
        order = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed * 1000 + self.epoch))
        for j, i in enumerate(order.tolist()):
            if j >= self._skip:
                yield {"input_ids": self.rows[i]}


def collate(examples):
    return {"input_ids": torch.stack([e["input_ids"] for e in examples])}


def make_loader(tokenizer, n: int = 10, batch_size: int = 2) -> DataLoader:
    return DataLoader(ToyStream(tokenizer, n=n), batch_size=batch_size, collate_fn=collate)


def lm_loss(model, batch):
    """Causal LM loss plus a logged component and the token count (the loop's loss contract)."""
    ids = batch["input_ids"]
    out = model(input_ids=ids, labels=ids)
    return {"loss": out.loss, "lm": out.loss.detach(), "aux": 0.5, "num_tokens": ids.numel()}


def make_manual_lm_loss(grad_accum: int):
    """lm_loss that runs its own backward (the loop's ``manual_backward`` contract)."""

    def fn(model, batch):
        out = lm_loss(model, batch)
        (out["loss"] / grad_accum).backward()
        return {**out, "loss": out["loss"].detach()}

    fn.manual_backward = True
    return fn


def tiny_setup():
    tok = make_tokenizer(with_slots=True)
    model = make_model("llama", vocab_size=len(tok), seed=0)
    return model, tok, tok.convert_tokens_to_ids(SLOTS)
