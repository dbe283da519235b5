"""sentence-transformers modules for llara models (``pip install 'llara[st]'``).

``modules.json`` of a llara export names these classes by import path (see ``llara.modeling.st_config``). Since
sentence-transformers 6.0 any module class outside its own package is imported only with
``trust_remote_code=True``, for local directories too; the class then comes from the installed
llara package, never from code inside the model directory:

>>> from sentence_transformers import SentenceTransformer              # doctest: +SKIP
>>> model = SentenceTransformer("runs/ft/final", trust_remote_code=True)  # doctest: +SKIP
>>> model.encode_query(["what is dense retrieval?"])                     # doctest: +SKIP

The ids are llara's own (``llara.prompts``), padding is on the right whatever the tokenizer's
``padding_side``, and the pooled positions travel with the batch, so the vectors equal
``Encoder.encode_queries`` / ``encode_corpus``.
"""
from __future__ import annotations

from typing import Any

from sentence_transformers.base.modules import Module, Transformer

from ..modeling.embed import pack, pad_token_id, pool, tokenize
from ..modeling.encoder import DEFAULT_MAX_PASSAGE_LENGTH, DEFAULT_MAX_QUERY_LENGTH
from ..modeling.loading import match_sentencepiece
from ..prompts import EncodedSide, Template, encode_side
from ..modeling.st_config import template_prompts

POOL_WEIGHTS = "llara_pool_weights"

__all__ = ["LlaraPooling", "LlaraTransformer"]


class LlaraTransformer(Transformer):
    """The stock Transformer module, tokenizing as llara does for the side a prompt names."""

    config_keys = Transformer.config_keys + ["llara_template", "max_query_length", "max_passage_length"]

    def __init__(
        self,
        model_name_or_path: str,
        *,
        llara_template: dict[str, Any],
        max_query_length: int = DEFAULT_MAX_QUERY_LENGTH,
        max_passage_length: int = DEFAULT_MAX_PASSAGE_LENGTH,
        **kwargs,
    ) -> None:
        super().__init__(model_name_or_path, **kwargs)
        match_sentencepiece(self.tokenizer)  # the ids llara.modeling.loading.load_tokenizer gives
        self.llara_template = llara_template
        self.template = Template.from_dict(llara_template, source=f"{model_name_or_path}/sentence_bert_config.json")
        self.max_query_length = int(max_query_length)
        self.max_passage_length = int(max_passage_length)
        self._encoded: dict[str, EncodedSide] = {}

    def _side_name(self, prompt: str | None, task: str | None) -> str:
        if not prompt:
            return "query" if task == "query" else "passage"
        prompts = template_prompts(self.template, self.tokenizer.eos_token)
        names = [("query" if name == "query" else "passage") for name, p in prompts.items() if p == prompt]
        if not names:
            raise ValueError(
                f"this llara model (template {self.template.name!r}) encodes with its own prompts; use "
                f"encode_query / encode_document or prompt_name='query' / 'document', not prompt={prompt!r}"
            )
        if len(names) == 2:  # both sides write out the same: the task decides, documents by default
            return "query" if task == "query" else "passage"
        return names[0]

    def _encoded_side(self, name: str) -> EncodedSide:
        if name not in self._encoded:
            self._encoded[name] = encode_side(self.tokenizer, self.template.side(name))
        return self._encoded[name]

    def preprocess(self, inputs, prompt: str | None = None, task: str | None = None, **kwargs) -> dict[str, Any]:
        if not inputs:
            return {}
        if not all(isinstance(t, str) for t in inputs):
            # not TypeError: sentence-transformers would retry with the prompt glued to the text
            raise ValueError("llara models encode plain strings only")
        name = self._side_name(prompt, task)
        side = self._encoded_side(name)
        max_length = self.max_query_length if name == "query" else self.max_passage_length
        texts = self.template.prepare(list(inputs))  # the template's casing, as llara's Encoder applies it
        built, _ = tokenize(self.tokenizer, side, texts, max_length)
        batch = pack(built, [side], pad_token_id(self.tokenizer))
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, POOL_WEIGHTS: batch.pool[0],
                "modality": "text"}

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        weights = features.pop(POOL_WEIGHTS, None)  # not a model input
        features = super().forward(features, **kwargs)
        if weights is not None:
            features[POOL_WEIGHTS] = weights
        return features


class LlaraPooling(Module):
    """Weighted sum of the token states with the weights ``LlaraTransformer`` made (in float32; the
    template's normalisation is sentence-transformers' own ``Normalize`` module, see ``st_config``)."""

    config_keys = ["embedding_dimension"]

    def __init__(self, embedding_dimension: int) -> None:
        super().__init__()
        self.embedding_dimension = int(embedding_dimension)

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        if POOL_WEIGHTS not in features:
            raise ValueError("LlaraPooling needs the pooling weights made by LlaraTransformer.preprocess")
        features["sentence_embedding"] = pool(features[POOL_WEIGHTS], features["token_embeddings"])
        return features

    def get_embedding_dimension(self) -> int:
        return self.embedding_dimension

    get_sentence_embedding_dimension = get_embedding_dimension

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.save_config(output_path)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token=None, cache_folder=None,
             revision=None, local_files_only: bool = False, **kwargs) -> "LlaraPooling":
        config = cls.load_config(model_name_or_path, subfolder=subfolder, token=token, cache_folder=cache_folder,
                                 revision=revision, local_files_only=local_files_only)
        return cls(**{k: v for k, v in config.items() if k in cls.config_keys})
