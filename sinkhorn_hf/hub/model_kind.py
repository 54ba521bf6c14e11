"""Which transformers Auto class, Hub pipeline tag and preprocessor fit a saved model, from its config."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..families import TEXT_FAMILIES, UnsupportedModelError

# First match wins; the names are transformers' own tables, so new architectures need no edit here.
_HEADS = (
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForSequenceClassification", "text-classification"),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForImageClassification", "image-classification"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "AutoModelForTokenClassification", "token-classification"),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "AutoModelForQuestionAnswering", "question-answering"),
    ("MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES", "AutoModelForMultipleChoice", None),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM", "fill-mask"),
    ("MODEL_FOR_MASKED_IMAGE_MODELING_MAPPING_NAMES", "AutoModelForMaskedImageModeling", None),
    ("MODEL_FOR_PRETRAINING_MAPPING_NAMES", "AutoModelForPreTraining", None),
)


@dataclass(frozen=True)
class ModelKind:
    """``auto_class`` is the transformers class that loads the checkpoint's architecture, e.g.
    ``"AutoModelForSequenceClassification"`` (or the concrete class for a head with no Auto class);
    ``pipeline_tag`` is the Hub task (None when the Hub has none); ``preprocessor_class`` loads its inputs."""

    auto_class: str
    pipeline_tag: str | None
    is_text: bool

    @property
    def preprocessor_class(self) -> str:
        return "AutoTokenizer" if self.is_text else "AutoImageProcessor"


def model_kind(config: Any) -> ModelKind:
    """Read ``config.model_type`` and ``config.architectures[0]`` (a bare encoder when absent). An architecture
    that is not a class name (an ASCII Python identifier) raises :class:`~sinkhorn_hf.UnsupportedModelError`: it
    goes into generated code (a model card's loading snippet) and is never trusted as text."""
    from ..compat import auto_mapping_names

    is_text = config.model_type in TEXT_FAMILIES
    architectures = getattr(config, "architectures", None) or []
    if architectures and not (
        isinstance(architectures[0], str) and architectures[0].isascii() and architectures[0].isidentifier()
    ):
        raise UnsupportedModelError(
            f"config.json names the architecture {architectures[0]!r}, which is not a class name (a Python "
            "identifier such as BertForSequenceClassification)"
        )
    if architectures:
        for table, auto_class, pipeline_tag in _HEADS:
            names = auto_mapping_names(table).get(config.model_type, ())
            if architectures[0] in ((names,) if isinstance(names, str) else names):
                return ModelKind(auto_class, pipeline_tag, is_text)
        if architectures[0] != auto_mapping_names("MODEL_MAPPING_NAMES").get(config.model_type):
            return ModelKind(architectures[0], None, is_text)
    return ModelKind("AutoModel", "feature-extraction" if is_text else "image-feature-extraction", is_text)
