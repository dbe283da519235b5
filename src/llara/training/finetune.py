"""``llara finetune``: contrastive fine-tuning (InfoNCE with hard and in-batch negatives).

Queries go through the template's query side (NEXT prompt for ``llara``), passages through its
passage side (SELF prompt). With ``grad_cache_chunk > 0`` the step is GradCache-style: embeddings
first without graphs, then a chunked backward, so large batches fit in small memory.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, replace

import torch


from ..modeling.embed import embed
from ..modeling.loading import ensure_slot_tokens, load_model
from ..prompts import get_template
from .config import TrainConfig
from .contrastive import ContrastiveCollator, UniquePositiveBatches, contrastive_loss, grad_cache_step, load_groups
from .loop import TrainResult, train
from .memory import StepShape

log = logging.getLogger(__name__)

# What fine-tuning changes in TrainConfig's defaults (TrainConfig's own are adaptation's): the authors'
# LoRA recipe (r 64, alpha 16, dropout 0.1, lr 3e-4; lr 1e-4 scored 0.020 lower, a linear decay +0.003:
# benchmarks/results/recipe.md). `llara finetune` and `llara recipe` use them; so does finetune_train_config.
# FinetuneConfig's temperature default (0.05, not the authors' 0.01) comes from the same measurements.
FINETUNE_TRAIN_DEFAULTS: dict = {"lora": True, "lr": 3e-4}


def finetune_train_config(**fields) -> TrainConfig:
    """A :class:`TrainConfig` with fine-tuning's defaults (:data:`FINETUNE_TRAIN_DEFAULTS`) under ``fields``."""
    return TrainConfig(**{**FINETUNE_TRAIN_DEFAULTS, **fields})


@dataclass
class FinetuneConfig:
    template: str = field(default="", metadata={"help": "template (queries: query side, passages: passage side); "
                                                      "default: the checkpoint's, else llara"})
    group_size: int = field(default=16, metadata={"help": "passages per query: 1 positive + group_size-1 hard negatives"})
    temperature: float = field(default=0.05, metadata={"help": "InfoNCE temperature on dot products "
                                                               "(cosine when the template normalises); the "
                                                               "authors' 0.01 scored 0.014 lower on average over "
                                                               "two seeds (benchmarks/results/recipe.md)"})
    max_query_length: int = field(default=64, metadata={"help": "tokens per query, prompt included"})
    max_passage_length: int = field(default=160, metadata={"help": "tokens per passage, prompt included"})
    cross_device: bool = field(default=True, metadata={"help": "use other processes' passages as negatives"})
    grad_cache_chunk: int = field(default=-1, metadata={"help": "GradCache chunk size in sequences (0: plain step; "
                                                              "-1: chosen from the memory budget, --memory-gb: a "
                                                              "plain step when the whole batch fits)"})
    data_seed: int = field(default=0, metadata={"help": "seed of batch composition and negative sampling"})
    packing: bool = field(default=True, metadata={"help": "pack several texts into each row of a forward pass "
                                                       "(no padding between them; the same states as padded "
                                                       "rows) where the model's attention keeps packed texts "
                                                       "apart (checked once on the model); else one padded "
                                                       "row per text"})

    def __post_init__(self):
        if self.group_size < 1 or self.temperature <= 0 or self.grad_cache_chunk < -1:
            raise ValueError("group_size must be >= 1, temperature > 0 and grad_cache_chunk >= -1 (-1: automatic)")


class _Batches:
    """Collated batches from the unique-positive sampler; ``set_epoch`` reshuffles and resamples."""

    def __init__(self, groups, sampler, collator):
        self.groups, self.sampler, self.collator = groups, sampler, collator
        self._skip = 0

    def set_epoch(self, epoch):
        self.sampler.set_epoch(epoch)
        self.collator.set_epoch(epoch)

    def skip(self, n: int) -> None:
        """Start the next iteration after ``n`` examples (whole batches) without collating them."""
        self._skip = n

    def __len__(self):
        return len(self.sampler)

    def __iter__(self):
        skip, self._skip = self._skip, 0
        done = 0
        for idx in self.sampler:
            if done < skip:
                done += len(idx)
                continue
            batch = self.collator([self.groups[i] for i in idx])
            batch["num_examples"] = len(idx)
            yield batch


def _num_tokens(batch) -> torch.Tensor:
    """Real tokens of a step's queries and passages, left on the device (the loop reads it once per step)."""
    if "num_tokens" in batch:  # packed: counted by the collator
        return batch["num_tokens"]
    return batch["query"]["attention_mask"].sum() + batch["passage"]["attention_mask"].sum()


def memory_plan(model, train_cfg: TrainConfig, cfg: FinetuneConfig) -> tuple[int, int, int, str]:
    """(GradCache chunk, tokens, sequence length) of the largest forward pass with a graph, and the
    choice in words when it was made here (the training loop logs it beside its checkpointing one).

    A fixed ``grad_cache_chunk`` is kept; -1 chooses from the memory budget (``memory.py``): a plain
    step when the whole batch's graph fits, else the largest power-of-two chunk that fits. The
    tokens counted are the padded maxima: ``batch_size`` queries and ``batch_size x group_size``
    passages."""
    from .memory import choose_chunk, plan_for
    from .setup import resolve_precision

    q, p = train_cfg.batch_size, train_cfg.batch_size * cfg.group_size
    seq = max(cfg.max_query_length, cfg.max_passage_length)
    whole = q * cfg.max_query_length + p * cfg.max_passage_length
    chunk, choice = cfg.grad_cache_chunk, ""
    if chunk == -1:
        device = "cpu" if train_cfg.cpu or not torch.cuda.is_available() else "cuda"
        plan = plan_for(model, device, precision=resolve_precision(train_cfg), lora=train_cfg.lora,
                        memory_gb=train_cfg.memory_gb)
        checkpointing = train_cfg.gradient_checkpointing is True
        chunk = choose_chunk(plan, q + p, seq, whole, checkpointing)
        tokens = whole if chunk == 0 else chunk * seq
        choice = "plain step" if chunk == 0 else f"GradCache, chunks of {chunk} sequences"
        if train_cfg.gradient_checkpointing != "auto":  # else the loop's memory line says it
            log.info("memory: %s -> %s", plan.describe(tokens, seq, checkpointing, chunk > 0), choice)
    return chunk, (whole if chunk == 0 else chunk * seq), seq, choice


def make_loss_fn(cfg: FinetuneConfig, grad_accum: int = 1):
    if cfg.grad_cache_chunk < 0:
        raise ValueError("grad_cache_chunk -1 (automatic) must be resolved first: see memory_plan")
    if cfg.grad_cache_chunk:
        def compute_loss(model, batch, no_sync=None):
            loss = grad_cache_step(model, batch, cfg.temperature, cfg.grad_cache_chunk,
                                   cross_device=cfg.cross_device, no_sync=no_sync, scale=1.0 / grad_accum)
            return {"loss": loss, "num_tokens": _num_tokens(batch)}

        compute_loss.manual_backward = True  # the loop must not call backward on the returned loss
        return compute_loss

    def compute_loss(model, batch):
        if "passes" in batch:  # packed by the collator: queries first, then passages
            both = torch.cat([embed(model, rows) for rows in batch["passes"]])
            q, p = both[: batch["num_queries"]], both[batch["num_queries"] :]
        else:
            q, p = embed(model, batch["query"]), embed(model, batch["passage"])
        return {"loss": contrastive_loss(q, p, cfg.temperature, cfg.cross_device), "num_tokens": _num_tokens(batch)}

    return compute_loss


def _packs(model, tokenizer, group) -> bool:
    """Whether the model keeps packed texts apart (:func:`llara.modeling.packing.packing_supported`),
    probed with the tokens of the first training line; logged either way."""
    from ..modeling.packing import packing_supported

    ids = tokenizer(" ".join([group.query, *group.pos]), add_special_tokens=False)["input_ids"]
    if len(ids) < 4:
        log.info("packing off: the first training line has too few tokens to check the model with")
        return False
    ok = packing_supported(model, ids)
    log.info("packing %s: %s", "on" if ok else "off", "texts share rows, no padding between them" if ok else
             "this model's attention does not keep packed texts apart; one padded row per text")
    return ok


def finetune(model_spec: str, data_path: str, train_cfg: TrainConfig, cfg: FinetuneConfig | None = None,
             *, model=None, tokenizer=None) -> TrainResult:
    """Contrastive fine-tuning (InfoNCE over 1 positive, ``group_size - 1`` hard negatives and the
    batch's other passages) on ``{query, pos: [...], neg: [...]}`` lines, e.g. from ``llara mine``.

    Examples:
        Two LoRA steps with ``llara finetune``'s defaults (``model_dir``: a tiny random
        checkpoint here; ``tmp``: a scratch directory):

        >>> import json
        >>> from llara import finetune
        >>> from llara.training.finetune import FinetuneConfig, finetune_train_config
        >>> lines = [{"query": "fish gills", "pos": ["Fish take oxygen from water through gills."],
        ...           "neg": ["Paris is the capital of France."]},
        ...          {"query": "capital of france", "pos": ["Paris is the capital of France."],
        ...           "neg": ["Fish take oxygen from water through gills."]}]
        >>> _ = (tmp / "train.jsonl").write_text("".join(json.dumps(x) + "\\n" for x in lines))
        >>> cfg = finetune_train_config(output_dir=str(tmp / "ft"), max_steps=2, batch_size=2, cpu=True,
        ...                             progress=False)
        >>> result = finetune(model_dir, str(tmp / "train.jsonl"), cfg, FinetuneConfig(group_size=2))
        >>> result.step, cfg.lora, cfg.lr                          # the authors' LoRA recipe: r 64, lr 3e-4
        (2, True, 0.0003)
    """
    cfg = cfg or FinetuneConfig()
    groups = load_groups(data_path, cfg.group_size)  # bad data fails before the model loads
    checkpoint_template = None
    if model is None:
        model, tokenizer, resolved = load_model(model_spec, causal_lm=True, device="cpu", dtype="float32")
        checkpoint_template = resolved.template
    template = get_template(cfg.template or checkpoint_template or "llara")
    log.info("fine-tuning with template %r", template.name)
    ensure_slot_tokens(tokenizer, model, template.slot_tokens)
    chunk, tokens, seq, choice = memory_plan(model, train_cfg, cfg)
    cfg = replace(cfg, grad_cache_chunk=chunk, packing=cfg.packing and _packs(model, tokenizer, groups[0]))
    collator = ContrastiveCollator(tokenizer, template, group_size=cfg.group_size,
                                   max_query_length=cfg.max_query_length,
                                   max_passage_length=cfg.max_passage_length, seed=cfg.data_seed,
                                   packing=cfg.packing, grad_cache_chunk=chunk)
    sampler = UniquePositiveBatches(groups, train_cfg.batch_size, seed=cfg.data_seed)
    data = _Batches(groups, sampler, collator)
    slot_ids = tokenizer.convert_tokens_to_ids(list(template.slot_tokens)) if template.slot_tokens else []
    extra = {"finetune": asdict(cfg), "finetune_data": str(data_path), "base_model": model_spec,
             "max_query_length": cfg.max_query_length, "max_passage_length": cfg.max_passage_length}
    return train(model, tokenizer, data, make_loss_fn(cfg, train_cfg.grad_accum), train_cfg, template=template,
                 trainable_token_ids=slot_ids, export_extra=extra,
                 step_shape=StepShape(tokens, seq, chunked=chunk > 0, choice=choice))
