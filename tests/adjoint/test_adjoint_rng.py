"""The one RNG helper: capture and restore the global generators, and fork them."""

from __future__ import annotations

import torch

from sinkhorn_hf.adjoint.rng import RngState, forked_rng


def test_restore_replays_the_same_numbers():
    torch.manual_seed(0)
    state = RngState([torch.device("cpu")])  # CPU devices are covered by the CPU generator itself
    first = torch.rand(5)
    assert state.devices == {} and state.nbytes == torch.get_rng_state().nbytes
    state.restore()
    torch.testing.assert_close(torch.rand(5), first, rtol=0, atol=0)


def test_forked_rng_leaves_the_stream_where_it_was_and_can_restart():
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    with forked_rng() as start:
        a = torch.rand(4)
        start.restore()
        torch.testing.assert_close(torch.rand(4), a, rtol=0, atol=0)
    torch.testing.assert_close(torch.rand(3), expected, rtol=0, atol=0)
