"""Prompt templates as data, and the exact token ids they produce.

A template says, for each side (query, passage), what goes before and after the text and how the
embedding is read from the final hidden states:

* ``slots``: mean of the states at the template's slot tokens (the authors' LLaRA form);
* ``last``: the state of the last token (EOS as RepLLaMA, PromptEOL, the paper form);
* ``mean``: mean of the states of the text tokens only.

Token ids are built as the authors' released code builds them (FlagEmbedding, ``research/LLARA``):
the prefix is tokenized *with* the tokenizer's special tokens (so LLaMA's BOS comes first), the text
*without* them and truncated to what the budget leaves, and the suffix *with* them, minus the special
tokens the tokenizer adds around any input (LLaMA's leading BOS). The text is the only thing ever
truncated: the prompt and its slots always survive.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

POOLINGS = ("slots", "last", "mean")
# How a text's letter case is normalised before tokenization (the same for queries and passages):
# keep it, lower-case every text, or lower-case only the texts written without a lower-case letter
# (a corpus in capitals: BM25 lower-cases, but a BPE tokenizer splits capitals into rare pieces).
CASINGS = ("keep", "lower", "lower_all_caps")
# lower_all_caps: on cisi written in capitals it keeps 0.98x of the original nDCG@10 (keep: 0.67x,
# BM25 1.00x) and changes nothing on the original (benchmarks/results/robustness_case.md). It also
# lower-cases short all-caps queries such as "HIV".
DEFAULT_CASING = "lower_all_caps"
SELF_SLOTS = tuple(f"<s{i}>" for i in range(1, 9))
NEXT_SLOTS = tuple(f"<s{i}>" for i in range(9, 17))
ALL_SLOTS = SELF_SLOTS + NEXT_SLOTS


class TemplateError(ValueError):
    """A template that cannot be built or used with a tokenizer."""


def apply_casing(text: str, casing: str) -> str:
    """``text`` with the template's case normalisation (see ``CASINGS``)."""
    if casing == "lower" or (casing == "lower_all_caps" and text == text.upper() and text != text.lower()):
        return text.lower()
    return text


@dataclass(frozen=True)
class PromptSide:
    """How one side (queries or passages) is wrapped and pooled."""

    prefix: str = ""
    suffix: str = ""
    pooling: str = "last"
    slots: tuple[str, ...] = ()
    append_eos: bool = False

    def __post_init__(self) -> None:
        if self.pooling not in POOLINGS:
            raise TemplateError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.pooling == "slots":
            if not self.slots:
                raise TemplateError("pooling 'slots' needs a non-empty 'slots' list")
            missing = [s for s in self.slots if s not in self.suffix]
            if missing:
                raise TemplateError(f"slot tokens {missing} do not appear in the suffix {self.suffix!r}")
        object.__setattr__(self, "slots", tuple(self.slots))

    def input_signature(self) -> tuple:
        """Sides with equal signatures feed identical ids to the model (only pooling differs)."""
        return (self.prefix, self.suffix, self.append_eos)


@dataclass(frozen=True)
class Template:
    """A named pair of prompt sides; saved with every checkpoint."""

    name: str
    query: PromptSide
    passage: PromptSide
    normalize: bool = True
    description: str = ""
    casing: str = DEFAULT_CASING

    def __post_init__(self) -> None:
        if self.casing not in CASINGS:
            raise TemplateError(f"casing must be one of {CASINGS}, got {self.casing!r}")

    def prepare(self, texts: Sequence[str]) -> list[str]:
        """The texts as the model sees them (case normalisation); used by encoding and training alike."""
        if self.casing == "keep":
            return list(texts)
        return [apply_casing(t, self.casing) for t in texts]

    def side(self, side: str) -> PromptSide:
        if side not in ("query", "passage"):
            raise ValueError(f"side must be 'query' or 'passage', got {side!r}")
        return self.query if side == "query" else self.passage

    @property
    def slot_tokens(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.passage.slots + self.query.slots))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "<dict>") -> "Template":
        try:
            unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
            if unknown:
                raise TemplateError(f"unknown template keys {sorted(unknown)}")
            sides = {}
            for key in ("query", "passage"):
                if key not in d or not isinstance(d[key], dict):
                    raise TemplateError(f"missing mapping {key!r}")
                bad = set(d[key]) - {f.name for f in dataclasses.fields(PromptSide)}
                if bad:
                    raise TemplateError(f"unknown keys {sorted(bad)} in {key!r}")
                sides[key] = PromptSide(**d[key])
            return cls(
                name=str(d.get("name", Path(source).stem)),
                query=sides["query"],
                passage=sides["passage"],
                normalize=bool(d.get("normalize", True)),
                description=str(d.get("description", "")),
                casing=str(d.get("casing", DEFAULT_CASING)),
            )
        except (TemplateError, TypeError) as e:
            raise TemplateError(f"{source}: invalid template: {e}") from None


_AUTHORS_PASSAGE = '", summarize the above passage within eight words: ' + "".join(SELF_SLOTS)
_AUTHORS_QUERY = '", predict the following passage within eight words: ' + "".join(NEXT_SLOTS)

BUILTIN_TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in [
        Template(
            "llara",
            query=PromptSide('"', _AUTHORS_QUERY, "slots", NEXT_SLOTS),
            passage=PromptSide('"', _AUTHORS_PASSAGE, "slots", SELF_SLOTS),
            description="authors' code: SELF prompt <s1>..<s8> for passages, NEXT prompt <s9>..<s16> for "
            "queries, mean of the 8 slot states",
        ),
        Template(
            "paper",
            query=PromptSide("", " The next sentence:", "last", append_eos=True),
            passage=PromptSide("", " The original sentence:", "last", append_eos=True),
            description="paper form: 'The original sentence:' / 'The next sentence:' + EOS, the EOS state",
        ),
        Template(
            "eos",
            query=PromptSide(pooling="last", append_eos=True),
            passage=PromptSide(pooling="last", append_eos=True),
            description="last token (EOS appended), as RepLLaMA",
        ),
        Template(
            "mean",
            # EOS is appended so that this template shares its forward pass with 'eos': under causal
            # attention the text tokens' states do not depend on it, and it is not pooled.
            query=PromptSide(pooling="mean", append_eos=True),
            passage=PromptSide(pooling="mean", append_eos=True),
            description="mean of the final states of the text tokens",
        ),
        Template(
            "prompteol",
            query=PromptSide('This sentence : "', '" means in one word:"', "last"),
            passage=PromptSide('This sentence : "', '" means in one word:"', "last"),
            description="PromptEOL: 'This sentence : \"...\" means in one word:\"', last token",
        ),
    ]
}
DEFAULT_TEMPLATE = "llara"


def get_template(spec: "str | Template | dict | None") -> Template:
    """A built-in name, a path to a .yaml/.json template file, a dict, or a Template."""
    if spec is None:
        return BUILTIN_TEMPLATES[DEFAULT_TEMPLATE]
    if isinstance(spec, Template):
        return spec
    if isinstance(spec, dict):
        return Template.from_dict(spec)
    if spec in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[spec]
    path = Path(spec)
    if path.suffix.lower() in (".yaml", ".yml", ".json"):
        if not path.is_file():
            raise TemplateError(f"{path}: template file not found")
        text = path.read_text(encoding="utf-8")
        try:
            data = json.loads(text) if path.suffix.lower() == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise TemplateError(f"{path}: cannot parse template: {e}") from None
        if not isinstance(data, dict):
            raise TemplateError(f"{path}: a template file must hold a mapping")
        return Template.from_dict(data, source=str(path))
    raise TemplateError(
        f"unknown template {spec!r}: use one of {sorted(BUILTIN_TEMPLATES)} or a .yaml/.json file"
    )


# ----------------------------------------------------------------------------------------------
# token ids
# ----------------------------------------------------------------------------------------------
def _strip_added_specials(tokenizer, ids: list[int]) -> list[int]:
    """Drop the special tokens a tokenizer adds around every input (e.g. LLaMA's BOS)."""
    around = tokenizer("", add_special_tokens=True)["input_ids"]
    head = 0
    while head < len(around) and head < len(ids) and ids[head] == around[head]:
        head += 1
    tail_ids = around[head:]
    if tail_ids and ids[len(ids) - len(tail_ids):] == tail_ids:
        ids = ids[: len(ids) - len(tail_ids)]
    return ids[head:]


@dataclass
class EncodedSide:
    """Pre-tokenized pieces of one prompt side for one tokenizer."""

    side: PromptSide
    prefix_ids: list[int]
    suffix_ids: list[int]
    eos_ids: list[int]
    slot_offsets: list[int] = field(default_factory=list)  # positions of the slots inside suffix_ids

    @property
    def overhead(self) -> int:
        return len(self.prefix_ids) + len(self.suffix_ids) + len(self.eos_ids)

    def build(self, text_ids: Sequence[int], max_length: int) -> tuple[list[int], int, int]:
        """ids for one text, truncated to ``max_length``; returns (ids, text_start, text_end)."""
        budget = max_length - self.overhead
        if budget < 1:
            raise TemplateError(
                f"max_length {max_length} leaves no room for text: the prompt alone takes {self.overhead} tokens"
            )
        text_ids = list(text_ids[:budget])
        ids = self.prefix_ids + text_ids + self.suffix_ids + self.eos_ids
        start = len(self.prefix_ids)
        return ids, start, start + len(text_ids)

    def pool_positions(self, length: int, text_start: int, text_end: int) -> list[int]:
        """Positions (inside an unpadded sequence of ``length`` tokens) that the pooling reads."""
        if self.side.pooling == "last":
            return [length - 1]
        if self.side.pooling == "mean":
            # An empty text has no tokens: fall back to the last token rather than dividing by zero.
            return list(range(text_start, text_end)) or [length - 1]
        base = text_end
        return [base + o for o in self.slot_offsets]


def encode_side(tokenizer, side: PromptSide) -> EncodedSide:
    """Tokenize a prompt side's fixed parts once, validating that its slots are single tokens."""
    prefix_ids = tokenizer(side.prefix, add_special_tokens=True)["input_ids"]
    suffix_ids = (
        _strip_added_specials(tokenizer, tokenizer(side.suffix, add_special_tokens=True)["input_ids"])
        if side.suffix
        else []
    )
    eos_ids: list[int] = []
    if side.append_eos:
        if tokenizer.eos_token_id is None:
            raise TemplateError("template appends EOS but the tokenizer has no eos_token")
        eos_ids = [tokenizer.eos_token_id]
    offsets = []
    for slot in side.slots:
        slot_id = tokenizer.convert_tokens_to_ids(slot)
        if slot_id is None or slot_id == tokenizer.unk_token_id:
            raise TemplateError(f"slot token {slot!r} is not in the tokenizer's vocabulary")
        where = [i for i, t in enumerate(suffix_ids) if t == slot_id]
        if len(where) != 1:
            raise TemplateError(f"slot token {slot!r} appears {len(where)} times in the tokenized suffix")
        offsets.append(where[0])
    return EncodedSide(side, prefix_ids, suffix_ids, eos_ids, offsets)
