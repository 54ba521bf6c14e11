"""DDP through accelerate (two CPU processes, gloo): the adjoint's gradients are all-reduced like plain ones (for
`reversible`, like plain backprop of the same coupled model)."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from adjoint_helpers import ddp_worker, rel_error, tiny_model

from sinkhorn_hf.adjoint import disable_adjoint, enable_adjoint
from sinkhorn_hf.adjoint.probe import scalar_loss


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["euler", "reversible"])
def test_ddp_via_accelerate(scheme, tmp_path):
    out = tmp_path / "grads.pt"
    mp.spawn(ddp_worker, args=(2, _free_port(), scheme, str(out)), nprocs=2, join=True)
    ddp_grads = torch.load(out)
    # Reference: one process, plain backprop, the mean of the two ranks' losses (what DDP averages).
    model, inputs = tiny_model("bert", dropout=0.0)
    if scheme == "reversible":  # the coupling is part of the function: plain backprop of the coupled model
        enable_adjoint(model, "reversible")
        disable_adjoint(model)
    loss = sum(scalar_loss(model(**{k: v[r : r + 1] for k, v in inputs.items()})) for r in range(2)) / 2
    loss.backward()
    exact = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert ddp_grads.keys() == exact.keys()
    assert rel_error(ddp_grads, exact) < 1e-3
