"""The attention routes (SDPA for K=1, the dense kernel-domain Function, the streaming Function with an SDPA
final pass) against plain autograd through the reference Sinkhorn of sinkhorn.py, in float64; settings
validation and model-level switches."""

import pytest
import torch
import transformers
from tiny_models import make_tiny, sharpen

import sinkhorn_hf.attention.dense as dense_module
import sinkhorn_hf.attention.routes as routes_module
import sinkhorn_hf.attention.triton.api as triton_api
from sinkhorn_hf.attention import SinkhornSettings
from sinkhorn_hf.attention.implicit import ImplicitSolver
from sinkhorn_hf.attention.routes import block_size_for, sinkhorn_attention
from sinkhorn_hf.attention.sinkhorn import sinkhorn
from sinkhorn_hf.attention.triton import TritonUnsupportedError

SCALE = 0.6
EXACT = ImplicitSolver(ridge=1e-13, tolerance=1e-13, max_iterations=500)
# route name -> settings that select it (return_weights always takes the dense route)
ROUTES = {"dense": dict(streaming=False), "streaming": dict(streaming=True, block_size=3)}


def case(lengths=(7, 5), n=None, heads=2, dim=4, seed=0, bias=True, dtype=torch.float64):
    """q, k, v (B, H, N, D), a learnable bias, and BERT-style padding masks."""
    generator = torch.Generator().manual_seed(seed)
    n = n or max(lengths)
    shape = (len(lengths), heads, n, dim)
    q, k, v = (torch.randn(shape, generator=generator, dtype=dtype).requires_grad_() for _ in range(3))
    b = torch.randn(len(lengths), 1, n, n, generator=generator, dtype=dtype).requires_grad_() if bias else None
    valid = torch.arange(n)[None] < torch.tensor(lengths)[:, None]
    allowed = valid[:, None, None, :].expand(len(lengths), 1, n, n)
    return dict(query=q, key=k, value=v, bias=b, allowed=allowed, query_valid=valid[:, None, :, None])


def reference(c, iterations, tolerance=None):
    scores = c["query"] @ c["key"].transpose(-1, -2) * SCALE + (0 if c["bias"] is None else c["bias"])
    return sinkhorn(scores, c["allowed"], c["query_valid"], iterations, tolerance) @ c["value"]


def inputs_of(c):
    return [t for t in (c["query"], c["key"], c["value"], c["bias"]) if t is not None]


def fast(c, iterations, return_weights=False, dropout=0.0, **settings):
    return sinkhorn_attention(
        c["query"],
        c["key"],
        c["value"],
        allowed=c["allowed"],
        bias=c["bias"],
        query_valid=c["query_valid"],
        scale=SCALE,
        settings=SinkhornSettings(iterations=iterations, **settings),
        dropout=dropout,
        return_weights=return_weights,
        solver=EXACT,
    )


def assert_same_gradients(out, expected, c, tol=1e-6):
    upstream = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(11))
    got = torch.autograd.grad((out * upstream).sum(), inputs_of(c))
    wanted = torch.autograd.grad((expected * upstream).sum(), inputs_of(c))
    for mine, theirs in zip(got, wanted, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=tol * theirs.abs().max())


@pytest.mark.parametrize("iterations", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("return_weights", [False, True], ids=["output", "weights"])
@pytest.mark.parametrize("route", ROUTES)
def test_output_and_gradient_match_autograd_through_the_loop(iterations, return_weights, route):
    c = case()
    out, weights = fast(c, iterations, return_weights, **ROUTES[route])
    expected = reference(c, iterations)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert (weights is not None) == return_weights
    assert_same_gradients(out, expected, c)


@pytest.mark.parametrize("route", ROUTES)
def test_tolerance_freezing_matches_the_reference(route):
    c = case(seed=3, heads=3)
    out, _ = fast(c, 9, tolerance=0.05, **ROUTES[route])
    expected = reference(c, 9, tolerance=0.05)
    assert not torch.allclose(expected, reference(c, 9), atol=1e-6), "the tolerance must stop some heads early"
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert_same_gradients(out, expected, c)


def test_returned_weights_are_the_sinkhorn_matrices_and_differentiable():
    c = case()
    out, weights = fast(c, 4, return_weights=True)
    scores = c["query"] @ c["key"].transpose(-1, -2) * SCALE + c["bias"]
    expected = sinkhorn(scores, c["allowed"], c["query_valid"], 4)
    torch.testing.assert_close(weights, expected, rtol=0, atol=1e-12)
    upstream = torch.randn_like(weights)
    got = torch.autograd.grad((weights * upstream).sum() + out.sum(), inputs_of(c))
    wanted = torch.autograd.grad((expected * upstream).sum() + reference(c, 4).sum(), inputs_of(c))
    for mine, theirs in zip(got, wanted, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-6 * theirs.abs().max())


@pytest.mark.parametrize("iterations", [301, 302])
@pytest.mark.parametrize("route", ROUTES)
def test_implicit_backward_gives_the_converged_gradient(iterations, route):
    c = case(seed=1)
    out, _ = fast(c, iterations, backward="implicit", **ROUTES[route])
    assert_same_gradients(out, reference(c, iterations), c)


def test_implicit_differs_from_unrolled_before_convergence():
    c = case(seed=1)
    implicit, _ = fast(c, 3, backward="implicit")
    unrolled, _ = fast(c, 3)
    torch.testing.assert_close(implicit, unrolled)  # same forward
    g_implicit = torch.autograd.grad(implicit.square().sum(), c["query"])[0]
    g_unrolled = torch.autograd.grad(unrolled.square().sum(), c["query"])[0]
    assert not torch.allclose(g_implicit, g_unrolled, atol=1e-4)


@pytest.mark.parametrize("iterations", [2, 3])
@pytest.mark.parametrize(
    "settings", [{"streaming": False}, {"backward": "implicit"}, {"streaming": True, "block_size": 2}]
)
def test_padding_invariance(iterations, settings):
    """Outputs of valid tokens and the gradients reaching them do not change when padding is appended."""
    padded = case(lengths=(6,), n=9, seed=2, bias=False)
    alone = dict(
        query=padded["query"][..., :6, :].detach().requires_grad_(),
        key=padded["key"][..., :6, :].detach().requires_grad_(),
        value=padded["value"][..., :6, :].detach().requires_grad_(),
        bias=None,
        allowed=None,
        query_valid=None,
    )
    out_padded, _ = fast(padded, iterations, **settings)
    out_alone, _ = fast(alone, iterations, **settings)
    torch.testing.assert_close(out_padded[..., :6, :], out_alone, rtol=0, atol=1e-12)
    upstream = torch.randn_like(out_alone)
    got = torch.autograd.grad((out_padded[..., :6, :] * upstream).sum(), inputs_of(padded))
    expected = torch.autograd.grad((out_alone * upstream).sum(), inputs_of(alone))
    for mine, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(mine[..., :6, :], theirs, rtol=0, atol=1e-12)
    assert torch.all(got[1][..., 6:, :] == 0) and torch.all(got[2][..., 6:, :] == 0), "padded keys get no gradient"


@pytest.mark.parametrize("route", ROUTES)
def test_packed_sequences_mask(route):
    """A 4D mask that differs between queries (two packed sequences) in both routes."""
    c = case(lengths=(8,), seed=9)
    block = torch.zeros(8, 8, dtype=torch.bool)
    block[:3, :3] = block[3:, 3:] = True
    c.update(allowed=block.expand(1, 1, 8, 8), query_valid=torch.ones(1, 1, 8, 1, dtype=torch.bool))
    out, _ = fast(c, 5, **ROUTES[route])
    expected = reference(c, 5)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert_same_gradients(out, expected, c)


@pytest.mark.parametrize("return_weights", [False, True])
@pytest.mark.parametrize("route", ROUTES)
def test_fully_masked_row_gives_zeros_and_finite_gradients(route, return_weights):
    c = case(lengths=(5,), seed=3)
    allowed = torch.ones(1, 1, 5, 5, dtype=torch.bool)
    allowed[..., 1, :] = False
    c.update(allowed=allowed, query_valid=torch.ones(1, 1, 5, 1, dtype=torch.bool))
    out, _ = fast(c, 4, return_weights, **ROUTES[route])
    assert torch.all(out[..., 1, :] == 0)
    torch.testing.assert_close(out, reference(c, 4), rtol=0, atol=1e-12)
    grads = torch.autograd.grad((out * torch.randn_like(out)).sum(), inputs_of(c))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("iterations", [3, 4])
@pytest.mark.parametrize("route", ROUTES)
def test_scores_far_below_the_row_maximum_match_the_log_domain(iterations, dtype, route):
    """Scores hundreds apart make exp(S - rowmax) underflow; results must still match the log domain."""
    c = case(seed=4, dtype=dtype, bias=False)
    c["bias"] = torch.zeros(2, 1, 7, 7, dtype=dtype)
    c["bias"][..., 2] = -900.0 if dtype == torch.float64 else -120.0  # one key far below every row's maximum
    c["bias"].requires_grad_()
    out, _ = fast(c, iterations, **ROUTES[route])
    expected = reference(c, iterations)
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(out, expected, rtol=0, atol=tolerance)
    assert_same_gradients(out, expected, c, tol=1e-6 if dtype == torch.float64 else 1e-4)


@pytest.mark.parametrize("iterations", [3, 4])
@pytest.mark.parametrize("route", ROUTES)
def test_gradcheck(iterations, route):
    c = case(lengths=(4, 3), heads=1, dim=2, seed=4)

    def run(q, k, v, b):
        return fast(dict(c, query=q, key=k, value=v, bias=b), iterations, **ROUTES[route])[0]

    assert torch.autograd.gradcheck(run, tuple(inputs_of(c)))


def _saved_bytes(fn) -> int:
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    return total


@pytest.mark.parametrize("route", ROUTES)
def test_saved_state_does_not_grow_with_iterations(route):
    n, heads = 32, 2
    c = case(lengths=(n, n - 5), heads=heads, dim=8, seed=9)
    growth = _saved_bytes(lambda: fast(c, 21, **ROUTES[route])) - _saved_bytes(lambda: fast(c, 3, **ROUTES[route]))
    assert 0 < growth <= 19 * 2 * heads * n * 8 * 1.01, "only the extra iterates (O(K·N)) may be saved"
    scores = c["query"] @ c["key"].transpose(-1, -2) * SCALE + c["bias"]
    reference_growth = _saved_bytes(lambda: sinkhorn(scores, c["allowed"], c["query_valid"], 21)) - _saved_bytes(
        lambda: sinkhorn(scores, c["allowed"], c["query_valid"], 3)
    )
    assert reference_growth >= 18 * 2 * heads * n * n * 8, "plain autograd keeps an N×N matrix per step"


@pytest.mark.parametrize("route", ROUTES)
def test_dropout_is_unbiased(route):
    c = case(lengths=(6,), heads=1, seed=5, bias=False)
    with torch.no_grad():
        clean, _ = fast(c, 3, **ROUTES[route])
        runs = torch.stack([fast(c, 3, dropout=0.3, **ROUTES[route])[0] for _ in range(200)])
    assert not torch.allclose(runs[0], clean), "dropout must change a single run"
    torch.testing.assert_close(runs.mean(0), clean, rtol=0, atol=0.1)


def test_dropout_gradient_matches_the_mask_it_used():
    """Dense route: with a fixed generator state the dropped-out weights and the gradient agree with autograd
    through the reference with the same mask."""
    c = case(lengths=(6,), heads=1, seed=6, bias=False)
    torch.manual_seed(0)
    out, weights = fast(c, 3, return_weights=True, dropout=0.4)
    scores = c["query"] @ c["key"].transpose(-1, -2) * SCALE
    plain = sinkhorn(scores, c["allowed"], c["query_valid"], 3)
    keep = weights != 0
    expected = (plain * keep / 0.6) @ c["value"]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert_same_gradients(out, expected, c)


def test_half_precision_is_computed_in_float32():
    c = case(seed=6, bias=False)
    half = {n: t.detach().to(torch.bfloat16) if t is not None and t.is_floating_point() else t for n, t in c.items()}
    single = {n: t.detach().float() if t is not None and t.is_floating_point() else t for n, t in half.items()}
    for route in ROUTES.values():
        out_half, _ = fast(half, 3, **route)
        out_single, _ = fast(single, 3, **route)
        assert out_half.dtype == torch.bfloat16
        torch.testing.assert_close(out_half.float(), out_single.to(torch.bfloat16).float(), rtol=0, atol=0)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"backward": "exact"}, r"sinkhorn_backward must be one of \('unrolled', 'implicit'\), got 'exact'"),
        ({"streaming": "yes"}, r"sinkhorn_streaming must be one of \('auto', True, False\), got 'yes'"),
        ({"streaming": 1}, r"sinkhorn_streaming must be one of"),
        ({"streaming_threshold": 0}, r"sinkhorn_streaming_threshold must be an int >= 1, got 0"),
        ({"block_size": 2.5}, r"sinkhorn_block_size must be None or an int >= 1, got 2.5"),
        ({"backend": "cuda"}, r"sinkhorn_backend must be one of \('auto', 'triton', 'torch'\), got 'cuda'"),
    ],
)
def test_bad_settings_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        SinkhornSettings(**bad)


def test_streaming_is_chosen_by_length_or_flag():
    auto = SinkhornSettings(streaming_threshold=1024)
    assert block_size_for(auto, 1023, 1023, 64) is None
    assert block_size_for(auto, 2048, 2048, 64) == 32, "a block of scores is half the size of Q"
    assert block_size_for(auto, 4096, 64, 8) == 256
    assert block_size_for(auto, 1024, 8192, 64) == 16, "at least 16 rows"
    assert block_size_for(SinkhornSettings(streaming=True, block_size=5), 10, 10, 64) == 5
    assert block_size_for(SinkhornSettings(streaming=False, streaming_threshold=1), 10**5, 10**5, 64) is None


def test_model_settings_select_the_modes():
    """A tiny BERT gives the same loss and gradients dense or streaming; the implicit gradient differs."""
    tiny = sharpen(make_tiny("bert", "sinkhorn"))
    tiny.model.config.sinkhorn_iterations = 3

    def loss_and_grad(**settings):
        for name, value in settings.items():
            setattr(tiny.model.config, f"sinkhorn_{name}", value)
        tiny.model.zero_grad()
        loss = tiny.model(**tiny.inputs).last_hidden_state[tiny.valid].square().mean()
        loss.backward()
        return loss.detach(), tiny.model.encoder.layer[0].attention.self.query.weight.grad.clone()

    dense = loss_and_grad(streaming=False, backward="unrolled")
    streamed = loss_and_grad(streaming=True, block_size=2)
    implicit = loss_and_grad(streaming=False, backward="implicit")
    torch.testing.assert_close(streamed, dense, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(implicit[0], dense[0])
    assert not torch.allclose(implicit[1], dense[1], rtol=1e-3, atol=0)


@pytest.mark.parametrize("iterations", [2, 3, 5])
def test_the_log_domain_dense_route_matches_the_reference(iterations, monkeypatch):
    """The dense route's log-domain Function, taken where the kernel domain's scalings could leave the dtype."""
    taken = []
    monkeypatch.setattr(dense_module, "kernel_domain_fits", lambda *args: taken.append(args) and False)
    c = case(seed=15)
    out, _ = fast(c, iterations, streaming=False)
    assert taken, "the dense route must ask which domain fits"
    expected = reference(c, iterations)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert_same_gradients(out, expected, c)


def test_the_kernel_domain_is_taken_while_its_scalings_fit_the_dtype():
    """N^(steps + 1) must stay within float32's resolution: K=3 at any dense length (symbolic lengths count as
    2^16), more steps only at small N; float64 allows far more."""
    fits = dense_module.kernel_domain_fits
    symbolic = torch.export.Dim("n")  # not an int: the bound for the largest dense length applies
    assert fits(3, 512, 512, torch.float32) and fits(3, symbolic, symbolic, torch.float32)
    assert fits(7, 512, 512, torch.float32) and not fits(8, 512, 512, torch.float32)
    assert not fits(4, symbolic, symbolic, torch.float32)
    assert fits(40, 2**16, 2**16, torch.float64)


def test_workspace_buffers_never_escape():
    """The dense route reuses scratch buffers between calls: nothing it returns may live in them."""
    first = case(seed=12)
    first["bias"] = torch.randn(2, 2, 7, 7, dtype=torch.float64).requires_grad_()  # full shape: nothing summed
    out, _ = fast(first, 3)
    grads = torch.autograd.grad(out.square().sum(), inputs_of(first))
    kept = [g.clone() for g in grads] + [out.detach().clone()]
    second = case(seed=13)
    second["bias"] = torch.randn(2, 2, 7, 7, dtype=torch.float64).requires_grad_()
    out2, _ = fast(second, 3)
    torch.autograd.grad(out2.square().sum(), inputs_of(second))
    for before, now in zip(kept, list(grads) + [out.detach()], strict=True):
        assert torch.equal(before, now)
    dense_module.WORKSPACE.clear()
    again, _ = fast(first, 3)
    torch.testing.assert_close(again, out, rtol=0, atol=0)


def test_workspace_stays_bounded_under_dynamic_padding():
    """Training with dynamic padding gives every batch another (batch, length): the dense route's cached scratch
    never holds more than the largest shape alone needs (it kept one set of N² buffers per shape, growing
    without bound), and results are those of a cold cache."""
    shapes = [(2, 9), (1, 5), (3, 7), (2, 4), (1, 9), (3, 3), (2, 8), (1, 6), (3, 9), (2, 5)]  # (batch, length)
    largest = max(shapes, key=lambda shape: shape[0] * shape[1] ** 2)

    def run(batch, n, seed=0):
        c = case(lengths=tuple(range(n, n - batch, -1)), seed=seed)
        out, _ = fast(c, 3)
        return [out.detach()] + list(torch.autograd.grad(out.square().sum(), inputs_of(c)))

    dense_module.WORKSPACE.clear()
    run(*largest)
    needed = dense_module.WORKSPACE.held_bytes()
    assert needed > 0
    for seed, shape in enumerate(shapes):
        warm = run(*shape, seed)
        assert dense_module.WORKSPACE.held_bytes() <= needed, f"after {shape}"
        dense_module.WORKSPACE.clear()
        cold = run(*shape, seed)
        for mine, theirs in zip(warm, cold, strict=True):
            torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
        run(*largest)


def test_training_after_inference_mode_reuses_no_inference_buffer():
    """encode() under inference_mode, then fine-tune (sentence-transformers' order): the dense route's cached
    buffers from the inference call must not reach autograd."""
    dense_module.WORKSPACE.clear()
    inputs = case(seed=14)
    with torch.inference_mode():
        expected, _ = fast({k: v.detach() if torch.is_tensor(v) else v for k, v in inputs.items()}, 3)
    out, _ = fast(inputs, 3)
    torch.autograd.grad(out.square().sum(), inputs_of(inputs))
    torch.testing.assert_close(out.detach(), expected, rtol=0, atol=0)


@pytest.mark.parametrize("route", ROUTES)
def test_autocast_does_not_lower_the_precision(route):
    c = case(seed=14, dtype=torch.float32)
    out, _ = fast(c, 3, **ROUTES[route])
    expected = torch.autograd.grad(out.square().sum(), inputs_of(c))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_autocast, _ = fast(c, 3, **ROUTES[route])
    assert out_autocast.dtype == torch.float32
    torch.testing.assert_close(out_autocast, out, rtol=0, atol=0)
    got = torch.autograd.grad(out_autocast.square().sum(), inputs_of(c))
    for mine, theirs in zip(got, expected, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)


def triton_case(device="cpu", **changes):
    """A float32 case the Triton kernels support (head dim 16), with padding and a bias."""
    c = case(dim=16, seed=21, dtype=torch.float32, **changes)
    return {name: value.detach().to(device).requires_grad_(value.requires_grad) for name, value in c.items()}


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts the calls that reach the Triton kernels."""
    calls = []
    kernels = routes_module.triton_sinkhorn_attention

    def counted(*args, **kwargs):
        calls.append(kwargs)
        return kernels(*args, **kwargs)

    monkeypatch.setattr(routes_module, "triton_sinkhorn_attention", counted)
    return calls


def test_backend_setting_persists_in_the_config(tmp_path):
    tiny = make_tiny("bert", "sinkhorn")
    tiny.model.config.sinkhorn_backend = "torch"
    tiny.model.config.save_pretrained(tmp_path)
    reloaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert reloaded.sinkhorn_backend == "torch"
    assert SinkhornSettings.from_config(reloaded).backend == "torch"
    assert SinkhornSettings().backend == "auto"


def test_auto_backend_on_cpu_never_takes_the_triton_kernels(triton_calls):
    c = triton_case()
    out, _ = fast(c, 3)
    expected, _ = fast(c, 3, backend="torch")
    assert triton_calls == []
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


# Slow: the Triton interpreter makes each case take seconds; test_tiny_bert_on_the_triton_backend_matches_torch keeps
# the kernels behind the routes (a padded batch, loss and gradients) in the fast suite.
@pytest.mark.slow
@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_triton_backend_runs_the_kernels_and_matches_torch(iterations, triton_calls):
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and not triton_api._interpreting():
        pytest.skip("no CUDA and Triton is not in its interpreter")
    c = triton_case("cuda" if torch.cuda.is_available() else "cpu")
    out, _ = fast(c, iterations, backend="triton")
    assert len(triton_calls) == 1
    expected, _ = fast(c, iterations, backend="torch")
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.device)
    got = torch.autograd.grad((out * upstream).sum(), inputs_of(c))
    wanted = torch.autograd.grad((expected * upstream).sum(), inputs_of(c))
    for mine, theirs in zip(got, wanted, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-4 * theirs.abs().max())


@pytest.mark.parametrize(
    "options, reason",
    [
        (dict(dropout=0.1), "dropout"),
        (dict(tolerance=1e-3), "tolerance"),
        (dict(backward="implicit"), "implicit"),
        (dict(return_weights=True), "attention weights"),
    ],
)
def test_unsupported_calls_fall_back_on_auto_and_raise_on_triton(options, reason, triton_calls):
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    c = triton_case(device)
    with pytest.raises(TritonUnsupportedError, match=f"sinkhorn_backend='triton' cannot run this call: .*{reason}"):
        fast(c, 3, backend="triton", **options)
    fast(c, 3, backend="auto", **options)  # the PyTorch routes
    assert triton_calls == []


def test_triton_backend_on_cpu_without_the_interpreter_says_why(monkeypatch, triton_calls):
    pytest.importorskip("triton")
    monkeypatch.setattr(triton_api, "_interpreting", lambda: False)
    with pytest.raises(TritonUnsupportedError, match="need CUDA tensors"):
        fast(triton_case(), 3, backend="triton")
    assert triton_calls == []


def test_tiny_bert_on_the_triton_backend_matches_torch(triton_calls):
    """End to end through the attention interface: loss and gradients of a tiny BERT (head dim 16, padded)."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and not triton_api._interpreting():
        pytest.skip("no CUDA and Triton is not in its interpreter")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tiny = sharpen(make_tiny("bert", "sinkhorn", layers=1, hidden_size=32), factor=5.0)
    tiny.model.to(device)
    inputs = {name: value.to(device) for name, value in tiny.inputs.items()}
    valid = tiny.valid.to(device)

    def loss_and_grads(backend):
        tiny.model.config.sinkhorn_backend = backend
        tiny.model.zero_grad()
        loss = tiny.model(**inputs).last_hidden_state[valid].square().mean()
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in tiny.model.encoder.parameters() if p.grad is not None]

    on_triton = loss_and_grads("triton")
    assert len(triton_calls) == 1, "the one layer's attention ran on the Triton kernels"
    on_torch = loss_and_grads("torch")
    assert len(triton_calls) == 1
    assert len(on_triton) == len(on_torch) > 1
    for mine, theirs in zip(on_triton, on_torch, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=1e-4 * max(theirs.abs().max().item(), 1e-3))
