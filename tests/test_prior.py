"""Diffusion prior loss pieces against hand computations and brute force."""

import itertools

import pytest
import torch

from switch_dit import prior
from switch_dit.models import create
from tests.test_models import randomize


def test_prior_table_by_hand():
    # T = 5, N = 2 blocks, M = 3, k = 2: 6 units, windows of k*N = 4 ones,
    # start = round((t / 4) ** 4 * (6 - 4)) = round([0, 0.0078, 0.125, 0.633, 2]) = [0, 0, 0, 1, 2]
    want = torch.tensor(
        [
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 1, 0, 0],
            [0, 1, 1, 1, 1, 0],
            [0, 0, 1, 1, 1, 1],
        ],
        dtype=torch.float32,
    )
    assert torch.equal(prior.prior_table(5, 2, 3, 2), want)


def test_prior_table_paper_config():
    w = prior.prior_table(1000, 28, 3, 2)
    assert w.shape == (1000, 84) and torch.all(w.sum(1) == 56)
    starts = w.argmax(1)
    assert starts[0] == 0 and starts[-1] == 84 - 56 and torch.all(starts[1:] >= starts[:-1])


def test_window_table_rounds_half_to_even():
    # units 3, beta 1/3: width 1, last 2; T = 3: (0.5 ** 1) * 2 = 1.0 exactly; with alpha 1 and T = 5
    # the starts are 0, 0.5, 1, 1.5, 2 -> numpy rounds halves to even: 0, 0, 1, 2, 2.
    w = prior.window_table(5, 3, 1 / 3, alpha=1.0)
    assert w.argmax(1).tolist() == [0, 0, 1, 2, 2]


def test_activation_map_and_ties():
    probs = torch.tensor([[[0.5, 0.3, 0.2], [0.25, 0.5, 0.25]]])  # (T=1, N=2, M=3); block 1 has a tie
    w = prior.activation_map(probs, 2)
    assert w.tolist() == [[1, 1, 0, 1, 1, 0]]  # the tie goes to the lower expert index


def test_matching_cost_and_assignment_by_brute_force():
    g = torch.Generator().manual_seed(0)
    a = (torch.rand(7, 5, generator=g) > 0.5).float()
    b = (torch.rand(7, 5, generator=g) > 0.5).float()
    cost = prior.matching_cost(a, b)
    direct = (a[:, :, None] - b[:, None, :]).abs().sum(0)
    assert torch.equal(cost, direct)
    perm = prior.assign(cost)
    best = min(sum(direct[i, p[i]] for i in range(5)) for p in itertools.permutations(range(5)))
    assert sum(direct[i, perm[i]] for i in range(5)) == best
    assert sorted(perm.tolist()) == list(range(5))


def test_jsd_known_values():
    p = torch.tensor([[1.0, 0.0], [0.5, 0.5]], dtype=torch.float64)
    q = torch.tensor([[0.0, 1.0], [0.5, 0.5]], dtype=torch.float64)
    d = prior.jsd(p, q, eps=0.0 + 1e-300)
    torch.testing.assert_close(d, torch.tensor([torch.log(torch.tensor(2.0)).item(), 0.0], dtype=torch.float64))
    x = torch.softmax(torch.randn(4, 6, dtype=torch.float64), -1)
    y = torch.softmax(torch.randn(4, 6, dtype=torch.float64), -1)
    torch.testing.assert_close(prior.jsd(x, y), prior.jsd(y, x))
    assert torch.all(prior.jsd(x, y) >= 0)


def _gate_probs(T=20, N=3, M=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(T, N, M, generator=g, dtype=torch.float64) * 2, -1)


def test_prior_loss_by_hand():
    T, N, M, k = 20, 3, 3, 2
    probs = _gate_probs(T, N, M)
    w_prior = prior.prior_table(T, N, M, k)
    t = torch.tensor([0, 7, 19, 7])
    got = prior.prior_loss(probs, w_prior, t, k, shuffle=False)
    # by hand: match units by brute force over all permutations of the 9 prior columns is too
    # many; use the direct L1 cost and scipy, then the JSD formula written out.
    w_gate = prior.activation_map(probs, k)
    direct = (w_gate[:, :, None] - w_prior[:, None, :]).abs().sum(0)
    perm = prior.assign(direct)
    p = probs.flatten(1)[t] / N
    q = w_prior[t][:, perm].double() / (k * N)
    mid = (p + q) / 2
    eps = 1e-6
    want = 0.5 * (
        (p * ((p + eps).log() - (mid + eps).log())).sum(1) + (q * ((q + eps).log() - (mid + eps).log())).sum(1)
    )
    torch.testing.assert_close(got, want.mean())


def test_prior_loss_shuffle_permutes_then_matches():
    """With shuffling, the columns of both maps are permuted before matching (the reference's
    tie-breaking); the optimal matching cost is the same, the loss is the JSD under that match."""
    T, N, M, k = 20, 3, 3, 2
    probs = _gate_probs(T, N, M, seed=1)
    w_prior = prior.prior_table(T, N, M, k)
    w_gate = prior.activation_map(probs, k)
    t = torch.arange(T)
    got = prior.prior_loss(probs, w_prior, t, k, generator=torch.Generator().manual_seed(5))
    g2 = torch.Generator().manual_seed(5)
    gperm, pperm = torch.randperm(N * M, generator=g2), torch.randperm(N * M, generator=g2)
    cost = prior.matching_cost(w_gate[:, gperm], w_prior[:, pperm])
    match = prior.assign(cost)
    unshuffled = prior.matching_cost(w_gate, w_prior)
    best = unshuffled[torch.arange(N * M), prior.assign(unshuffled)].sum()
    assert cost[torch.arange(N * M), match].sum() == best
    q = w_prior[t][:, pperm][:, match].double() / (k * N)
    want = prior.jsd(probs.flatten(1)[t][:, gperm] / N, q).mean()
    torch.testing.assert_close(got, want)


def test_prior_loss_gradcheck_float64():
    w_prior = prior.prior_table(20, 3, 3, 2)
    t = torch.tensor([1, 5, 12])
    logits = (torch.randn(20, 3, 3, dtype=torch.float64) * 2).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda z: prior.prior_loss(torch.softmax(z, -1), w_prior, t, 2, shuffle=False), (logits,)
    )


def _tiny_model(**kw):
    """A float64 Switch-DiT-S/2 small enough for exact checks: depth 3, 30 timesteps, 3 classes."""
    return create(
        "Switch-DiT-S/2",
        input_size=8,
        in_channels=1,
        num_classes=3,
        hidden_size=12,
        depth=3,
        num_heads=2,
        num_timesteps=30,
        **kw,
    ).double()


def test_model_prior_loss_uses_the_gate_table():
    m = _tiny_model(prior="exact")
    t = torch.tensor([0, 10, 29])
    table = m.gate_table()
    assert table.shape == (30, 3, 3)
    torch.testing.assert_close(table.sum(-1), torch.ones(30, 3, dtype=torch.float64))
    want = prior.prior_loss(table, m.w_prior, t, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(m.prior_loss(t, generator=torch.Generator().manual_seed(0)), want)
    m.prior_loss(t).backward()
    assert m.routers[0].f_gate[1].weight.grad.abs().sum() > 0
    assert m.t_embedder.mlp[0].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_model_prior_is_matched_by_default_on_every_backend(backend):
    """prior="matched" (the default) does not depend on backend: the one-step-lagged
    assignment, whose first call is the synchronous unshuffled solve."""
    m = randomize(_tiny_model(backend=backend), seed=3)
    assert m.prior_mode == "matched"
    t = torch.tensor([0, 10, 29])
    want = prior.prior_loss(m.gate_table(), m.w_prior, t, 2, shuffle=False)
    torch.testing.assert_close(m.prior_loss(t), want)
    assert m.prior_matcher is not None and m.prior_matcher.state_dict()["perm"] is not None
    with pytest.raises(ValueError, match="prior must be one of \\('matched', 'exact'\\)"):
        create("Switch-DiT-S/2", input_size=8, hidden_size=12, depth=1, num_heads=2, prior="reference")


def test_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        prior.prior_table(10, 2, 3, 4)
    with pytest.raises(ValueError, match="beta"):
        prior.window_table(10, 4, 1.5)
    with pytest.raises(ValueError, match="w_prior"):
        prior.prior_loss(_gate_probs(), prior.prior_table(10, 3, 3, 2), torch.tensor([0]), 2)
    with pytest.raises(ValueError, match="gate_probs"):
        prior.activation_map(torch.rand(4, 3), 2)


def test_matched_prior_loss_equals_synchronous():
    probs = _gate_probs(seed=3)
    w_prior = prior.prior_table(20, 3, 3, 2)
    t = torch.tensor([3, 3, 11, 19])
    matcher = prior.AsyncAssignment()
    for _ in range(2):
        got = prior.prior_loss_matched(probs, w_prior, t, 2, matcher)
        torch.testing.assert_close(got, prior.prior_loss(probs, w_prior, t, 2, shuffle=False))


@pytest.mark.gpu
def test_async_assignment_cuda_no_sync_after_first_call():
    probs = _gate_probs(seed=4).cuda()
    w_prior = prior.prior_table(20, 3, 3, 2).cuda()
    t = torch.tensor([0, 5, 19], device="cuda")
    matcher = prior.AsyncAssignment()
    want = prior.prior_loss(probs, w_prior, t, 2, shuffle=False)
    torch.testing.assert_close(prior.prior_loss_matched(probs, w_prior, t, 2, matcher), want)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(5):
            got = prior.prior_loss_matched(probs, w_prior, t, 2, matcher)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.testing.assert_close(got, want)


def _costs_with_distinct_matchings(U=5, n=4, seed=0):
    """n random (U, U) costs whose optimal matchings all differ."""
    g = torch.Generator().manual_seed(seed)
    costs = []
    while len(costs) < n:
        c = torch.rand(U, U, generator=g, dtype=torch.float64)
        if all(not torch.equal(prior.assign(c), prior.assign(d)) for d in costs):
            costs.append(c)
    return costs


def test_async_assignment_lags_one_call_and_resumes_exactly():
    """Call n uses the matching of call n - 1's cost (the first call its own); a matcher
    restored from state_dict() continues as the saved one would have, where a fresh one
    would not."""
    costs = _costs_with_distinct_matchings()
    matcher = prior.AsyncAssignment()
    got = [matcher(c).clone() for c in costs[:2]]
    assert torch.equal(got[0], prior.assign(costs[0])) and torch.equal(got[1], prior.assign(costs[0]))
    state = matcher.state_dict()
    third = matcher(costs[2]).clone()
    assert torch.equal(third, prior.assign(costs[1]))

    resumed = prior.AsyncAssignment()
    resumed.load_state_dict({k: v.clone() if v is not None else None for k, v in state.items()})
    assert set(resumed.state_dict()) == {"perm", "cost"}  # a restored, unused matcher saves what it got
    assert torch.equal(resumed(costs[2]), third)
    assert torch.equal(resumed(costs[3]), prior.assign(costs[2]))
    assert not torch.equal(prior.AsyncAssignment()(costs[2]), third)  # without the state: another matching
    with pytest.raises(ValueError, match="perm"):
        resumed.load_state_dict({"perm": None})


def test_matching_cost_is_exact_under_autocast():
    """The cost counts up to T = 1000 mismatches: bf16 autocast must not round it."""
    g = torch.Generator().manual_seed(0)
    w_gate = (torch.rand(1000, 84, generator=g) < 0.6).float()
    w_prior = (torch.rand(1000, 84, generator=g) < 0.6).float()
    want = (w_gate.double()[:, :, None] - w_prior.double()[:, None, :]).abs().sum(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = prior.matching_cost(w_gate, w_prior)
    assert got.dtype == torch.float32 and torch.equal(got.double(), want)
