"""Tiny random models and an in-process tokenizer for fast, offline tests."""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

WORDS = (
    "the a an of to in and is was for on with as by at from that this it be are were "
    "retrieval dense model language large passage query document text sentence search "
    "index vector embedding token train test data paris france capital city river "
    "water fish plant cell blood heart brain study result method paper science summarize "
    "above within eight words predict following , . : \" ' ? ! ( ) - 0 1 2 3 4 5 6 7 8 9 "
    "means one word this sentence original next"
).split()
SLOTS = [f"<s{i}>" for i in range(1, 17)]


def make_tokenizer(with_slots: bool = False, add_bos: bool = True) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with BOS/EOS/PAD/UNK; BOS prepended like LLaMA's when add_bos."""
    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(set(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    if with_slots:
        fast.add_special_tokens({"additional_special_tokens": SLOTS})
    return fast


CONFIGS = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "gemma": GemmaConfig,
    "gemma2": Gemma2Config,  # eager only (attention soft-capping)
    "gemma3_text": Gemma3TextConfig,
}


def make_model(arch: str = "llama", vocab_size: int = 128, attn: str = "sdpa", seed: int = 0, **kw):
    """A 2-layer, hidden-32 random causal LM of the given architecture."""
    torch.manual_seed(seed)
    cfg = CONFIGS[arch](
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
        **kw,
    )
    cfg._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn)
    model.eval()
    return model


def make_corpus_tokenizer(texts, add_bos: bool = True) -> PreTrainedTokenizerFast:
    """Like make_tokenizer, with the word-level vocabulary trained on ``texts`` (few unknown words)."""
    from tokenizers import normalizers, trainers

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=specials, min_frequency=1))
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
