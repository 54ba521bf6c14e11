"""FSDP: Sinkhorn attention trains on two CPU processes (gloo) like one process; the adjoint schemes that run one
layer at a time train under FSDP1 and FSDP2 like in one process; ``"auto"`` is refused, at ``enable_adjoint`` and in
the trainer.

accelerate turns FSDP on for accelerator devices only (on CPU it trains with DDP instead, which ``make_accelerator``
refuses), so the processes here shard the model as accelerate's FSDP2 does it on GPUs, with torch's own
``fully_shard``: every encoder layer, then the root. FSDP1 wraps every encoder layer in ``FullyShardedDataParallel``.
"""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from accelerate.utils import DistributedType
from tiny_models import make_tiny

from sinkhorn_hf.adjoint import enable_adjoint
from sinkhorn_hf.adjoint.api import check_adjoint_under_fsdp
from sinkhorn_hf.adjoint.probe import scalar_loss
from sinkhorn_hf.training.arguments import TrainerArguments
from sinkhorn_hf.training.trainer import Trainer, make_accelerator
from sinkhorn_hf.user_errors import UsageError

STEPS = 3
# (adjoint scheme, FSDP version)
CASES = [("off", 2), ("euler", 2), ("heun", 2), ("checkpoint", 2), ("momentum", 2), ("reversible", 2), ("euler", 1)]
AUTO_REFUSED = "'auto' does not run under FSDP"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sinkhorn_bert(scheme: str):
    """(model in train mode, padded inputs): a 3-layer Sinkhorn BERT under adjoint ``scheme``, no dropout."""
    tiny = make_tiny("bert", attn_implementation="sinkhorn", layers=3)
    tiny.model.train()
    enable_adjoint(tiny.model, scheme)
    return tiny.model, tiny.inputs


def _row(inputs: dict, r: int) -> dict:
    return {k: v[r : r + 1] for k, v in inputs.items()}


def _shard(model: torch.nn.Module, version: int) -> torch.nn.Module:
    if version == 2:
        from torch.distributed.fsdp import fully_shard

        for layer in model.encoder.layer:
            fully_shard(layer)
        return fully_shard(model)
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.bert.modeling_bert import BertLayer

    policy = ModuleWrapPolicy({BertLayer})
    return FullyShardedDataParallel(model, auto_wrap_policy=policy, device_id=torch.device("cpu"))


def _full_parameters(model: torch.nn.Module, version: int) -> dict[str, torch.Tensor]:
    if version == 2:
        return {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()}
    from torch.distributed.fsdp import FullyShardedDataParallel

    with FullyShardedDataParallel.summon_full_params(model):
        return {n.replace("_fsdp_wrapped_module.", ""): p.detach().clone() for n, p in model.named_parameters()}


def _train(model: torch.nn.Module, step_loss) -> list[float]:
    """``STEPS`` AdamW steps on ``step_loss(model)``; the losses."""
    # No weight decay: the loss leaves the pooler unused, and FSDP1 gives it a zero gradient (one flat parameter)
    # where one process gives none, which AdamW would decay.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(STEPS):
        optimizer.zero_grad()
        loss = step_loss(model)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def fsdp_worker(rank: int, port: int, out_dir: str) -> None:
    """One of two ranks: every case of ``CASES`` sharded and trained on the rank's own row of the batch."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        results = {}
        for scheme, version in CASES:
            model, inputs = _sinkhorn_bert(scheme)
            whole = sum(p.numel() for p in model.parameters())
            model = _shard(model, version)
            held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())
            assert held < 0.6 * whole, (held, whole)  # each rank holds about half of the parameters
            row = _row(inputs, rank)
            losses = _train(model, lambda m, row=row: scalar_loss(m(**row)))
            results[scheme, version] = (losses, _full_parameters(model, version))
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _one_process(scheme: str) -> tuple[list[list[float]], dict[str, torch.Tensor]]:
    """The same steps in one process on both rows: the mean of the two rows' losses (what FSDP averages); each
    row's losses and the final parameters."""
    model, inputs = _sinkhorn_bert(scheme)
    per_row: list[list[float]] = [[], []]

    def step_loss(m):
        losses = [scalar_loss(m(**_row(inputs, r))) for r in range(2)]
        for r, loss in enumerate(losses):
            per_row[r].append(loss.item())
        return sum(losses) / 2

    _train(model, step_loss)
    return per_row, {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.slow
def test_fsdp_on_two_processes_trains_like_one(tmp_path):
    mp.spawn(fsdp_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    plain = _one_process("off")
    for scheme, version in CASES:
        per_row, params = _one_process(scheme) if scheme != "off" else plain
        for r in range(2):
            losses, sharded = ranks[r][scheme, version]
            torch.testing.assert_close(losses, per_row[r], rtol=0, atol=1e-5, msg=f"{scheme} FSDP{version} losses")
            assert sharded.keys() == params.keys()
            for name, value in params.items():
                label = f"{scheme} FSDP{version} {name}"
                torch.testing.assert_close(sharded[name], value, rtol=0, atol=1e-5, msg=label)
    # The checkpoint scheme is exact: under FSDP it trains as plain backprop in one process.
    for name, value in plain[1].items():
        torch.testing.assert_close(ranks[0]["checkpoint", 2][1][name], value, rtol=0, atol=1e-5)


def test_auto_adjoint_refused_when_accelerate_launches_fsdp(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch --use_fsdp` sets
    model = make_tiny("bert").model
    with pytest.raises(ValueError, match=AUTO_REFUSED):
        enable_adjoint(model, "auto")
    assert [s.scheme for s in enable_adjoint(model, "euler")] == ["euler"]


def test_adjoint_on_an_fsdp2_model_refuses_auto_and_late_enabling(monkeypatch):
    from torch.distributed.fsdp import fully_shard

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        model = make_tiny("bert").model
        enable_adjoint(model, "auto")
        check_adjoint_under_fsdp(model)  # not sharded yet
        for layer in model.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
        with pytest.raises(ValueError, match=AUTO_REFUSED):
            check_adjoint_under_fsdp(model)
        with pytest.raises(ValueError, match=AUTO_REFUSED):
            enable_adjoint(model, "auto")
        with pytest.raises(ValueError, match="enable the adjoint before sharding"):
            enable_adjoint(model, "euler")
    finally:
        dist.destroy_process_group()


def _trainer_under_fsdp(model, args: TrainerArguments) -> Trainer:
    """A Trainer whose accelerator uses FSDP (a stand-in: accelerate builds none on CPU)."""
    return Trainer(
        model,
        args,
        train_dataset=[],
        eval_datasets={"": []},
        data_collator=None,
        compute_metrics=None,
        accelerator=SimpleNamespace(distributed_type=DistributedType.FSDP),
        run_info=None,
    )


def test_trainer_refuses_auto_adjoint_under_fsdp(tmp_path):
    model = make_tiny("bert").model
    enable_adjoint(model, "auto")  # before accelerate's FSDP state exists, as a script would
    with pytest.raises(ValueError, match=AUTO_REFUSED):
        _trainer_under_fsdp(model, TrainerArguments(output_dir=str(tmp_path)))
    enable_adjoint(model, "euler")
    assert _trainer_under_fsdp(model, TrainerArguments(output_dir=str(tmp_path))).adjoint_on


def test_trainer_refuses_marginal_tracking_under_fsdp(tmp_path):
    args = TrainerArguments(output_dir=str(tmp_path), track_attention_marginals=5)
    with pytest.raises(ValueError, match="train with DDP"):
        _trainer_under_fsdp(make_tiny("bert").model, args)


def test_fsdp_asked_for_on_cpu_is_refused(monkeypatch, tmp_path):
    # accelerate would silently train without sharding (DDP across processes, nothing in one process)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UsageError, match="runs FSDP on GPUs"):  # one line, exit status 2, in a script
        make_accelerator(TrainerArguments(output_dir=str(tmp_path)))
