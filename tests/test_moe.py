"""dMoE layer: router maths, attribute conditioning, gradients, noise, equality with the official loop algorithm."""
from __future__ import annotations

import pytest
import torch

from napari_dmoe.model import moe as moe_module
from napari_dmoe.model.moe import DMoE, RoutingError, capture_routing, top_k_gates
from napari_dmoe.model.reference import dense_dmoe, loop_dmoe, loop_gates

DIM = 12


def make(n_attr: int = 3, seed: int = 0, **kw) -> DMoE:
    torch.manual_seed(seed)
    return DMoE(DIM, n_attr, **kw).eval()


def tokens(b: int = 3, n: int = 10, seed: int = 1) -> torch.Tensor:
    return torch.randn(b, n, DIM, generator=torch.Generator().manual_seed(seed))


def routed_gates(m: DMoE, x: torch.Tensor, attr: torch.Tensor) -> torch.Tensor:
    with capture_routing(m) as records:
        m(x, attr)
    assert len(records) == 1
    return records[0].weights.movedim(1, -1)  # [B, N, E]


@pytest.mark.parametrize("top_k", [1, 2, 3])
def test_exactly_top_k_weights_that_sum_to_one(top_k):
    m = make(top_k=top_k)
    gates = routed_gates(m, tokens(), torch.tensor([0, 1, 2]))
    assert gates.shape == (3, 10, 8)
    assert ((gates > 0).sum(-1) == top_k).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(3, 10))


def test_top_k_gates_match_softmax_with_minus_inf():
    logits = torch.randn(5, 7, 8)
    idx, w = top_k_gates(logits, None, 2)
    masked = torch.full_like(logits, float("-inf")).scatter(-1, idx, logits.gather(-1, idx))
    torch.testing.assert_close(torch.zeros_like(logits).scatter(-1, idx, w), masked.softmax(-1))
    assert (logits.gather(-1, idx).min(-1).values >= logits.topk(2, -1).values[..., 1]).all()


def test_attribute_of_one_sample_changes_only_that_sample():
    m = make()
    x = tokens()
    with torch.no_grad():
        before = m(x, torch.tensor([0, 1, 2]))
        after = m(x, torch.tensor([0, 2, 2]))
    # unchanged samples agree up to float rounding (matmul blocking depends on how many tokens each expert gets)
    torch.testing.assert_close(before[[0, 2]], after[[0, 2]], atol=1e-6, rtol=0)
    assert (before[1] - after[1]).abs().max() > 1e-2
    # the changed sample is now routed exactly like sample 2 would be with the same tokens
    with torch.no_grad():
        alone = m(x[1:2], torch.tensor([2]))
    torch.testing.assert_close(after[1:2], alone)


@pytest.mark.parametrize("n_attr,top_k,n_experts", [(3, 2, 8), (1, 1, 4), (5, 3, 6)])
def test_equals_official_loop_algorithm(n_attr, top_k, n_experts):
    m = make(n_attr, top_k=top_k, n_experts=n_experts)
    x = tokens(b=4, n=33)
    attr = torch.tensor([n_attr - 1, 0, n_attr - 1, 0])
    with torch.no_grad():
        ours = m(x, attr)
        torch.testing.assert_close(ours, loop_dmoe(m, x, attr), atol=1e-5, rtol=0)
        torch.testing.assert_close(ours, dense_dmoe(m, x, attr), atol=1e-5, rtol=0)
        gates, _ = loop_gates(m, x, attr)
    torch.testing.assert_close(routed_gates(m, x, attr), gates, atol=1e-6, rtol=0)


def test_chunked_dispatch_equals_loop(monkeypatch):
    monkeypatch.setattr(moe_module, "DISPATCH_CHUNK", 5)  # many chunks per expert
    m = make()
    x, attr = tokens(b=2, n=40), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(m(x, attr), loop_dmoe(m, x, attr), atol=1e-5, rtol=0)


@pytest.mark.parametrize("top_k,chunk", [(2, 16384), (2, 5), (3, 7), (1, 16384)])
def test_training_dispatch_matches_the_loop_forward_and_backward(monkeypatch, top_k, chunk):
    """With autograd on, the dispatch gathers instead of scatter-adding: the same output as the inference path
    (bit for bit where k <= 2) and the same gradients as autograd through the official loop."""
    monkeypatch.setattr(moe_module, "DISPATCH_CHUNK", chunk)
    m = make(top_k=top_k)
    x, attr = tokens(b=3, n=17), torch.tensor([2, 0, 2])
    g = torch.randn(3, 17, DIM, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        inference = m(x, attr)
    grads = []
    for fn in (m, lambda a, b: loop_dmoe(m, a, b)):
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out = fn(xi, attr)
        (out * g).sum().backward()
        grads.append((out.detach(), xi.grad, {n: p.grad for n, p in m.named_parameters()}))
    (ours, gx, gp), (loop, lx, lp) = grads
    if top_k <= 2:
        assert torch.equal(ours, inference)
    torch.testing.assert_close(ours, loop, atol=1e-5, rtol=0)
    torch.testing.assert_close(gx, lx, atol=1e-5, rtol=0)
    assert gp.keys() == lp.keys()
    for name in gp:  # an expert no token chose runs nothing and gets no gradient
        if name.startswith("experts.") and (lp[name] is None or not lp[name].any()):
            assert gp[name] is None, name
        else:
            param = dict(m.named_parameters())[name]
            zero = torch.zeros_like(param)  # a router (or noise layer) no sample used: None in the loop
            ours_grad = zero if gp[name] is None else gp[name]
            torch.testing.assert_close(ours_grad, zero if lp[name] is None else lp[name], atol=1e-5, rtol=0, msg=name)


def test_gradients_reach_only_chosen_experts_and_the_used_router():
    m = make()
    x = tokens(b=1, n=1)
    attr = torch.tensor([1])
    chosen = set(torch.nonzero(routed_gates(m, x, attr)[0, 0]).flatten().tolist())
    assert len(chosen) == 2
    m(x, attr).sum().backward()
    for e, expert in enumerate(m.experts):
        grad = expert.fc1.weight.grad
        if e in chosen:
            assert grad is not None and grad.abs().sum() > 0
        else:
            assert grad is None or not grad.any()
    for r, router in enumerate(m.routers):
        grad = router.gate.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == (r == 1)
        # eval mode has no noise, so no router's noise layer is used
        assert router.noise.weight.grad is None or not router.noise.weight.grad.any()


def test_training_noise_trains_the_noise_layer_of_the_used_router_only():
    m = make().train()
    m(tokens(), torch.tensor([2, 2, 2])).sum().backward()
    assert m.routers[2].noise.weight.grad.abs().sum() > 0
    assert not m.routers[0].noise.weight.grad.any()


def test_eval_is_deterministic_and_noisy_eval_reproduces_official_noise():
    x, attr = tokens(b=2, n=50), torch.tensor([0, 1])
    m = make()
    with torch.no_grad():
        assert torch.equal(m(x, attr), m(x, attr))
    noisy = make(noisy_eval=True)
    with torch.no_grad():
        torch.manual_seed(5)
        a = noisy(x, attr)
        torch.manual_seed(5)
        b = noisy(x, attr)
        c = noisy(x, attr)
        clean = make()(x, attr)
    assert torch.equal(a, b)  # same seed, same noise
    assert not torch.equal(b, c)  # fresh noise changes routing
    assert not torch.equal(a, clean)


def test_capture_does_not_change_output_and_uses_the_grid():
    m = make()
    x, attr = tokens(b=2, n=12), torch.tensor([0, 2])
    with torch.no_grad():
        plain = m(x, attr)
        with capture_routing(m) as records:
            captured = m(x, attr, position="stage3", grid=(3, 4))
    assert torch.equal(plain, captured)
    assert records[0].position == "stage3" and records[0].weights.shape == (2, 8, 3, 4)
    torch.testing.assert_close(records[0].weights.sum(1), torch.ones(2, 3, 4))
    assert m._routing_sink is None  # capture ends with the block


def test_bad_inputs_raise_clear_errors():
    m = make()
    with pytest.raises(RoutingError, match="out of range.*3 router"):
        m(tokens(), torch.tensor([0, 1, 3]))
    with pytest.raises(RoutingError, match="one per sample"):
        m(tokens(), torch.tensor([0, 1]))
    with pytest.raises(RoutingError, match=r"\[B, N, 12\]"):
        m(torch.randn(3, 10, 5), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="top_k"):
        DMoE(DIM, 2, n_experts=4, top_k=5)


def test_aux_loss_is_off_by_default_and_differentiable_when_on():
    m = make()
    x, attr = tokens(), torch.tensor([0, 1, 2])
    m(x, attr)
    assert m.last_aux_loss is None
    m.aux_loss_enabled = True
    m(x, attr)
    loss = m.last_aux_loss
    assert loss.dim() == 0 and torch.isfinite(loss) and loss > 0
    loss.backward()
    assert m.routers[0].gate.weight.grad.abs().sum() > 0


def test_shared_layer_accumulates_one_aux_term_per_call_until_reset():
    # The TransUNet calls ONE dMoE from every block: the balance loss must cover all calls, not the last one.
    m = make()
    m.aux_loss_enabled = True
    attr = torch.tensor([0, 1, 2])
    m(tokens(seed=1), attr)
    m(tokens(seed=2), attr)
    assert len(m.aux_losses) == 2
    first, second = m.aux_losses
    assert not torch.equal(first, second)
    torch.testing.assert_close(m.last_aux_loss, (first + second) / 2)
    m.reset_aux_losses()
    assert m.aux_losses == [] and m.last_aux_loss is None


def test_balance_loss_agrees_with_training_load_balancing_loss():
    from napari_dmoe.training.losses import load_balancing_loss

    m = make()  # eval: no noise, so the chosen experts are the top k of the gate logits in both
    m.aux_loss_enabled = True
    x, attr = tokens(), torch.tensor([0, 1, 2])
    m(x, attr)
    gate_logits, _ = m.router_logits(x, attr)
    expected = load_balancing_loss(gate_logits.softmax(-1), top_k=m.top_k)
    torch.testing.assert_close(m.last_aux_loss, expected)
    # Collapsed routing (every token to one expert pair with near-certain gates) costs far more than balanced.
    collapsed = torch.full((30, 8), -20.0)
    collapsed[:, 7] = 9.0
    assert load_balancing_loss(collapsed.softmax(-1), top_k=2) > 3.5


def test_runs_under_autocast_close_to_float32():
    m = make()
    x, attr = tokens(b=2, n=20), torch.tensor([0, 2])
    with torch.no_grad():
        full = m(x, attr)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = m(x, attr)
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), full, atol=5e-2, rtol=5e-2)
