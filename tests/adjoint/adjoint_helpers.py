"""Tiny random models of every family the adjoint supports, exact-backprop references, and the scripts' modules."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from types import ModuleType

import torch
import transformers

from sinkhorn_hf.adjoint.probe import scalar_loss
from sinkhorn_hf.compat import model_from_config

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"

CONFIGS = {
    "bert": ("BertConfig", "BertModel"),
    "roberta": ("RobertaConfig", "RobertaModel"),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel"),
    "camembert": ("CamembertConfig", "CamembertModel"),
    "electra": ("ElectraConfig", "ElectraModel"),
    "ernie": ("ErnieConfig", "ErnieModel"),
    "distilbert": ("DistilBertConfig", "DistilBertModel"),
    "albert": ("AlbertConfig", "AlbertModel"),
    "vit": ("ViTConfig", "ViTModel"),
    "deit": ("DeiTConfig", "DeiTModel"),
    "vit_mae": ("ViTMAEConfig", "ViTMAEModel"),
    "dinov2": ("Dinov2Config", "Dinov2Model"),
}
TEXT = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "distilbert", "albert")


def script_module(name: str) -> ModuleType:
    """``scripts/<name>.py`` imported as a module, with scripts/ on the path for its sibling helper modules."""
    if str(SCRIPTS) not in sys.path:
        sys.path.insert(0, str(SCRIPTS))
    return importlib.import_module(name)


def tiny_config(model_type: str, layers: int = 3, dropout: float = 0.1, **extra):
    cls = getattr(transformers, CONFIGS[model_type][0])
    if model_type == "distilbert":
        return cls(
            dim=16,
            hidden_dim=32,
            n_layers=layers,
            n_heads=2,
            vocab_size=99,
            max_position_embeddings=64,
            dropout=dropout,
            attention_dropout=dropout,
            **extra,
        )
    kwargs = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    if model_type in TEXT:
        kwargs.update(vocab_size=99, max_position_embeddings=64)
    else:
        kwargs.update(image_size=16, patch_size=4, num_channels=3)
    if model_type == "albert":
        kwargs.update(embedding_size=8, num_hidden_groups=1, inner_group_num=1)
    if model_type == "dinov2":
        kwargs.update(drop_path_rate=dropout)
    if model_type == "vit_mae":
        kwargs.update(mask_ratio=0.0)
    kwargs.update(extra)
    return cls(**kwargs)


def tiny_model(model_type: str, layers: int = 3, dropout: float = 0.1, attn: str = "eager", seed: int = 0, **extra):
    """(model in train mode, inputs): a padded text batch or a small image batch."""
    torch.manual_seed(seed)
    model_cls = getattr(transformers, CONFIGS[model_type][1])
    model = model_from_config(model_cls, tiny_config(model_type, layers, dropout, **extra), attn_implementation=attn)
    model.train()
    generator = torch.Generator().manual_seed(seed + 1)
    if model_type in TEXT:
        lengths = torch.tensor([7, 4, 9])
        valid = torch.arange(9)[None] < lengths[:, None]
        ids = torch.randint(3, 99, (3, 9), generator=generator) * valid
        return model, {"input_ids": ids, "attention_mask": valid.long()}
    inputs = {"pixel_values": torch.randn(2, 3, 16, 16, generator=generator)}
    if model_type == "vit_mae":  # fixed patch order (MAE shuffles patches with random noise otherwise)
        inputs["noise"] = torch.arange(16, dtype=torch.float).expand(2, 16)
    return model, inputs


@torch.no_grad()
def unit_scale_stream(model) -> None:
    """Make a vision model's residual stream O(1) in every token (as in a trained ViT).

    At init (std 0.02) the CLS/distillation tokens and the patches are ~1e-2: a pre-LN block's LayerNorm then
    amplifies any reconstruction error by ~100 and the reverse step fails (the probe reports it).
    """
    embeddings = getattr(model, "embeddings", None)
    if embeddings is None or not hasattr(embeddings, "patch_embeddings"):
        return
    generator = torch.Generator().manual_seed(5)
    for name, param in embeddings.named_parameters():
        if name.endswith("projection.weight"):
            param.normal_(0.0, param[0].numel() ** -0.5, generator=generator)
        elif name.endswith("_token") or name == "position_embeddings":
            param.normal_(0.0, 1.0, generator=generator)


def ode_like(layers: int = 16):
    """(ViT model, inputs) whose residual branches vary smoothly in depth (gain 0.5) on an O(1) stream: rebuilt
    accurately under residual scale 1/L, off by >1% per layer without it."""
    model, inputs = tiny_model("vit", layers=layers, dropout=0.1)
    unit_scale_stream(model)
    script_module("adjoint_experiments").set_depth_profile(model, "smooth", gain=0.5, seed=1)
    return model, inputs


def loss_and_grads(model, inputs, seed: int = 1) -> tuple[float, dict[str, torch.Tensor | None]]:
    """One training step's loss and parameter gradients (``.grad``), with dropout seeded by ``seed``."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = scalar_loss(model(**inputs))
    loss.backward()
    return loss.item(), {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def rel_error(grads, exact) -> float:
    num = sum(float((grads[n] - g).double().norm() ** 2) for n, g in exact.items() if g is not None)
    den = sum(float(g.double().norm() ** 2) for g in exact.values() if g is not None)
    return (num / den) ** 0.5


def ddp_worker(rank: int, world: int, port: int, scheme: str, out_path: str) -> None:
    """One rank of a CPU DDP run through accelerate: each rank trains on its own row of the batch."""
    import os

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    from accelerate import Accelerator, DistributedDataParallelKwargs

    from sinkhorn_hf.adjoint import enable_adjoint

    # The loss leaves the pooler unused: DDP must be told, or it never launches its all-reduce.
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True, kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    model, inputs = tiny_model("bert", dropout=0.0)
    enable_adjoint(model, scheme)
    model = accelerator.prepare(model)
    assert isinstance(model, torch.nn.parallel.DistributedDataParallel), type(model)
    row = {k: v[rank : rank + 1] for k, v in inputs.items()}
    accelerator.backward(scalar_loss(model(**row)))
    if rank == 0:
        torch.save({n: p.grad for n, p in model.module.named_parameters() if p.grad is not None}, out_path)
    accelerator.wait_for_everyone()
