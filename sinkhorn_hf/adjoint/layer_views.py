"""Per-family views of one encoder layer as a short list of residual sublayers.

A sublayer is ``x -> N(x + s·b(x))`` when it has a LayerNorm ``N`` after the sum (post-LN, BERT-like) and
``x -> x + s·b(x)`` when it has none (pre-LN, ViT-like: the LayerNorm is inside the branch ``b``). ``s`` is the
residual scale (1 for pretrained models). The views call the model's own submodules (attention included), so
they do not depend on the attention implementation, and with ``s = 1`` they compute exactly what the
transformers layer computes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..families import UnsupportedModelError

Tensor = torch.Tensor


@dataclass(frozen=True)
class Sublayer:
    """One residual update: ``branch`` is b (B, T, H) -> (B, T, H); ``norm`` the post-sum LayerNorm or None."""

    branch: Callable[[Tensor], Tensor]
    norm: nn.LayerNorm | None = None


# view(layer, attention_mask, attention_kwargs) -> the layer's sublayers, in forward order
LayerView = Callable[[nn.Module, Any, dict], list[Sublayer]]


def _bert_view(layer: nn.Module, mask: Any, kwargs: dict) -> list[Sublayer]:
    attention, output = layer.attention, layer.output

    def attend(x: Tensor) -> Tensor:
        context = attention.self(x, attention_mask=mask, **kwargs)[0]
        return attention.output.dropout(attention.output.dense(context))

    def feed_forward(x: Tensor) -> Tensor:
        return output.dropout(output.dense(layer.intermediate(x)))

    return [Sublayer(attend, attention.output.LayerNorm), Sublayer(feed_forward, output.LayerNorm)]


def _distilbert_view(layer: nn.Module, mask: Any, kwargs: dict) -> list[Sublayer]:
    def attend(x: Tensor) -> Tensor:
        return layer.attention(x, attention_mask=mask, **kwargs)[0]

    return [Sublayer(attend, layer.sa_layer_norm), Sublayer(layer.ffn, layer.output_layer_norm)]


def _albert_view(layer: nn.Module, mask: Any, kwargs: dict) -> list[Sublayer]:
    attention = layer.attention

    def attend(x: Tensor) -> Tensor:
        # AlbertAttention applies its LayerNorm itself; the branch is what its output dropout returns.
        captured: list[Tensor] = []
        handle = attention.output_dropout.register_forward_hook(lambda m, a, out: captured.append(out))
        try:
            attention(x, mask, **kwargs)
        finally:
            handle.remove()
        return captured[0]

    return [Sublayer(attend, attention.LayerNorm), Sublayer(layer.ff_chunk, layer.full_layer_layer_norm)]


def _vit_view(layer: nn.Module, mask: Any, kwargs: dict) -> list[Sublayer]:
    def attend(x: Tensor) -> Tensor:
        return layer.dropout(layer.attention(layer.layernorm_before(x), mask, **kwargs)[0])

    def mlp(x: Tensor) -> Tensor:
        return layer.dropout(layer.mlp(layer.layernorm_after(x)))

    return [Sublayer(attend), Sublayer(mlp)]


def _dinov2_view(layer: nn.Module, mask: Any, kwargs: dict) -> list[Sublayer]:
    def attend(x: Tensor) -> Tensor:
        out = layer.attention(layer.norm1(x), attention_mask=mask, **kwargs)[0]
        return layer.drop_path(layer.layer_scale1(out))

    def mlp(x: Tensor) -> Tensor:
        return layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(x))))

    return [Sublayer(attend), Sublayer(mlp)]


def _post_ln_attention_mlp_view(layer: nn.Module, mask: Any, kwargs: dict) -> list[Sublayer]:
    """GTE and Nomic BERT: ``x -> LN(x + drop(attn(x)))``, then ``x -> LN(x + drop(mlp(x)))``."""

    def attend(x: Tensor) -> Tensor:
        return layer.post_attention_dropout(layer.self_attn(x, attention_mask=mask, **kwargs)[0])

    def mlp(x: Tensor) -> Tensor:
        return layer.post_mlp_dropout(layer.mlp(x))

    return [Sublayer(attend, layer.post_attention_layernorm), Sublayer(mlp, layer.post_mlp_layernorm)]


def _pre_norm_view(attention: str, attention_norm: str, mlp: str, mlp_norm: str) -> LayerView:
    """The view of a pre-norm layer ``x -> x + attn(N1(x))``, ``x -> x + mlp(N2(x))`` whose submodules have the
    given attribute names (any dropout is inside ``attn`` and ``mlp``)."""

    def view(layer: nn.Module, mask: Any, kwargs: dict) -> list[Sublayer]:
        def attend(x: Tensor) -> Tensor:
            return getattr(layer, attention)(getattr(layer, attention_norm)(x), attention_mask=mask, **kwargs)[0]

        def feed_forward(x: Tensor) -> Tensor:
            return getattr(layer, mlp)(getattr(layer, mlp_norm)(x))

        return [Sublayer(attend), Sublayer(feed_forward)]

    return view


def _pre_ln_bert_view(layer: nn.Module, mask: Any, kwargs: dict) -> list[Sublayer]:
    """ESM and XLM-RoBERTa-XL: BERT's modules with the LayerNorm moved to the start of each branch."""
    attention = layer.attention
    attention_norm = getattr(attention, "LayerNorm", None) or attention.self_attn_layer_norm

    def attend(x: Tensor) -> Tensor:
        context = attention.self(attention_norm(x), attention_mask=mask, **kwargs)[0]
        return attention.output.dropout(attention.output.dense(context))

    def feed_forward(x: Tensor) -> Tensor:
        out = layer.output.dense(layer.intermediate(layer.LayerNorm(x)))
        return layer.output.dropout(out) if hasattr(layer.output, "dropout") else out

    return [Sublayer(attend), Sublayer(feed_forward)]


def _videomae_view(layer: nn.Module, mask: Any, kwargs: dict) -> list[Sublayer]:
    """VideoMAE's layers take no mask; its attention module returns the projected (dropped-out) output."""

    def attend(x: Tensor) -> Tensor:
        return layer.attention(layer.layernorm_before(x), **kwargs)

    def feed_forward(x: Tensor) -> Tensor:
        return layer.output.dropout(layer.output.dense(layer.intermediate(layer.layernorm_after(x))))

    return [Sublayer(attend), Sublayer(feed_forward)]


def _wav2vec2_view(layer: nn.Module, mask: Any, kwargs: dict) -> list[Sublayer]:
    """wav2vec2 and HuBERT: pre-LN with ``do_stable_layer_norm``, post-LN without."""
    if getattr(layer, "adapter_layer", None) is not None:
        raise UnsupportedModelError(
            "the adjoint does not support wav2vec2 layers with an adapter (config.adapter_attn_dim): the adapter "
            "adds a third residual branch after the feed-forward one."
        )
    if layer.training and getattr(layer.attention.config, "layerdrop", 0.0) > 0:
        raise UnsupportedModelError(
            "the adjoint needs every layer to run in every training pass, and LayerDrop skips layers at random: set "
            "config.layerdrop = 0 to train with the adjoint."
        )
    stable = type(layer).__name__.endswith("StableLayerNorm")

    def attend(x: Tensor) -> Tensor:
        return layer.dropout(layer.attention(layer.layer_norm(x) if stable else x, attention_mask=mask, **kwargs)[0])

    def feed_forward(x: Tensor) -> Tensor:
        return layer.feed_forward(layer.final_layer_norm(x) if stable else x)

    if stable:
        return [Sublayer(attend), Sublayer(feed_forward)]
    return [Sublayer(attend, layer.layer_norm), Sublayer(feed_forward, layer.final_layer_norm)]


# model_type -> (class name(s) of the modules held in the stack's nn.ModuleList, view of one layer)
ADJOINT_FAMILIES: dict[str, tuple[str | tuple[str, ...], LayerView]] = {
    "bert": ("BertLayer", _bert_view),
    "roberta": ("RobertaLayer", _bert_view),
    "xlm-roberta": ("XLMRobertaLayer", _bert_view),
    "camembert": ("CamembertLayer", _bert_view),
    "electra": ("ElectraLayer", _bert_view),
    "ernie": ("ErnieLayer", _bert_view),
    "distilbert": ("TransformerBlock", _distilbert_view),
    "albert": ("AlbertLayerGroup", _albert_view),
    "vit": ("ViTLayer", _vit_view),
    "deit": ("DeiTLayer", _vit_view),
    "vit_mae": ("ViTMAELayer", _vit_view),
    "dinov2": ("Dinov2Layer", _dinov2_view),
    "data2vec-text": ("Data2VecTextLayer", _bert_view),
    "gte": ("GteLayer", _post_ln_attention_mlp_view),
    "nomic_bert": ("NomicBertLayer", _post_ln_attention_mlp_view),
    # ModernBERT's first layer has an identity attention norm
    "modernbert": ("ModernBertEncoderLayer", _pre_norm_view("attn", "attn_norm", "mlp", "mlp_norm")),
    # EuroBERT: RMSNorm; a bidirectional encoder despite the class name
    "eurobert": (
        "EuroBertDecoderLayer",
        _pre_norm_view("self_attn", "input_layernorm", "mlp", "post_attention_layernorm"),
    ),
    "esm": ("EsmLayer", _pre_ln_bert_view),
    "xlm-roberta-xl": ("XLMRobertaXLLayer", _pre_ln_bert_view),
    "vit_msn": ("ViTMSNLayer", _vit_view),
    "ijepa": ("IJepaLayer", _vit_view),
    "audio-spectrogram-transformer": ("ASTLayer", _vit_view),
    "dinov3_vit": ("DINOv3ViTLayer", _dinov2_view),
    "siglip2_vision_model": ("Siglip2EncoderLayer", _pre_norm_view("self_attn", "layer_norm1", "mlp", "layer_norm2")),
    # the composite (Siglip2ForImageClassification, Siglip2Model): its towers' stacks have the same layers
    "siglip2": ("Siglip2EncoderLayer", _pre_norm_view("self_attn", "layer_norm1", "mlp", "layer_norm2")),
    "videomae": ("VideoMAELayer", _videomae_view),
    "wav2vec2": (("Wav2Vec2EncoderLayer", "Wav2Vec2EncoderLayerStableLayerNorm"), _wav2vec2_view),
    "hubert": (("HubertEncoderLayer", "HubertEncoderLayerStableLayerNorm"), _wav2vec2_view),
}
# Types sinkhorn_hf serves whose layers are not one residual stack the adjoint can reverse, and why.
ADJOINT_REFUSED = {
    "whisper": "Whisper's encoder layer clamps float16 activations after each residual sum, which no reverse step "
    "undoes",
    "swin": "Swin's stages merge patches between blocks and shift windows, so its layers are not one stack of "
    "same-shape residual blocks",
}


@dataclass
class Stack:
    """A residual layer stack found in a model.

    ``owner`` runs the loop over layers; ``positions[n]`` is the layer module run at depth n (ALBERT repeats
    its shared layers); ``name`` is the path of the layer list, e.g. ``"bert.encoder.layer"``.
    """

    name: str
    owner: nn.Module
    positions: list[nn.Module]
    view: LayerView


def _albert_positions(owner: nn.Module) -> list[nn.Module]:
    config, groups = owner.config, owner.albert_layer_groups
    per_group = config.num_hidden_layers / config.num_hidden_groups
    return [layer for i in range(config.num_hidden_layers) for layer in groups[int(i / per_group)].albert_layers]


def model_type_of(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def find_stacks(model: nn.Module) -> list[Stack]:
    """All residual layer stacks of ``model`` (a transformers model, possibly wrapped by peft)."""
    model_type = model_type_of(model)
    if model_type in ADJOINT_REFUSED:
        raise UnsupportedModelError(
            f"the adjoint does not support {type(model).__name__} (model_type={model_type!r}): "
            f"{ADJOINT_REFUSED[model_type]}."
        )
    if model_type not in ADJOINT_FAMILIES:
        raise UnsupportedModelError(
            f"the adjoint does not support {type(model).__name__} (model_type={model_type!r}): it needs a "
            f"known residual encoder stack. Supported model types: {', '.join(ADJOINT_FAMILIES)}."
        )
    class_names, view = ADJOINT_FAMILIES[model_type]
    class_names = (class_names,) if isinstance(class_names, str) else class_names
    stacks = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if not all(type(child).__name__ in class_names for child in module):
            continue
        owner = model.get_submodule(name.rpartition(".")[0])
        positions = _albert_positions(owner) if model_type == "albert" else list(module)
        stacks.append(Stack(name, owner, positions, view))
    if not stacks:
        raise UnsupportedModelError(
            f"no stack of {' or '.join(class_names)} layers found in {type(model).__name__} (model_type={model_type!r})"
        )
    return stacks
