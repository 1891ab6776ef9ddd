"""The verification step: greedy against a loop reference, sampled against the target's exact
joint distribution (chi-square on a toy vocabulary, vectorised over many independent chains)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from llamazh.speculative import verify_greedy, verify_sampled


def _greedy_reference(logits, drafts):
    n_acc, nxt = [], []
    for row in range(drafts.shape[0]):
        n = 0
        while n < drafts.shape[1] and int(logits[row, n].argmax()) == int(drafts[row, n]):
            n += 1
        n_acc.append(n)
        nxt.append(int(logits[row, n].argmax()))
    return n_acc, nxt


@given(b=st.integers(1, 4), k=st.integers(0, 6), v=st.integers(2, 9), seed=st.integers(0, 2**16))
def test_greedy_matches_loop_reference(b, k, v, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k + 1, v, generator=gen)
    # draft the argmax most of the time so long accepted runs occur
    drafts = logits[:, :k].argmax(-1)
    flip = torch.rand(b, k, generator=gen) < 0.3
    drafts = torch.where(flip, torch.randint(0, v, (b, k), generator=gen), drafts)
    verdict = verify_greedy(logits, drafts)
    n_ref, next_ref = _greedy_reference(logits, drafts)
    assert verdict.num_accepted.tolist() == n_ref
    assert verdict.next_token.tolist() == next_ref


def test_identical_distributions_accept_everything():
    gen = torch.Generator().manual_seed(0)
    p = torch.rand(512, 5, 7, generator=gen).softmax(-1)
    drafts = torch.multinomial(p[:, :4].reshape(-1, 7), 1, generator=gen).view(512, 4)
    verdict = verify_sampled(p, p[:, :4].clone(), drafts, generator=gen)
    assert verdict.num_accepted.eq(4).all()


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"\(B, k \+ 1, V\)"):
        verify_greedy(torch.zeros(1, 3, 5), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="draft_probs"):
        verify_sampled(
            torch.zeros(1, 3, 5),
            torch.zeros(1, 2, 6),
            torch.zeros(1, 2, dtype=torch.long),
            generator=None,
        )


# ---- statistical test ------------------------------------------------------------------

V = 4  # toy vocabulary
M = 3  # length of the joint distribution tested (V**M = 64 cells)
K = 2  # drafted tokens per step
N = 1 << 20  # independent chains


def _tables(seed):
    """First-order Markov target P and draft Q: row V is the start state. Zeros on both sides
    exercise min(1, p/q) = 0 and the clamp of the residual."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(V + 1, V, generator=gen) ** 2
    q = torch.rand(V + 1, V, generator=gen) ** 2
    p[:, 0] = 0.0
    q[:, 1] = 0.0
    q[0, 3] = 0.0
    return p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)


def _run_chains(p_table, q_table, *, deterministic_draft, gen, contaminate=0.0):
    """Speculative sampling on N chains for M steps -> (N, M) first tokens of each chain."""
    rows = torch.arange(N)
    buf = torch.zeros(N, M * (K + 1), dtype=torch.long)
    lengths = torch.zeros(N, dtype=torch.long)
    last = torch.full((N,), V)
    for _ in range(M):  # each step emits >= 1 token
        drafts, qs, prev = [], [], last
        for _ in range(K):
            q_rows = q_table[prev]  # (N, V)
            if deterministic_draft:
                tok = q_rows.argmax(-1)
            else:
                tok = torch.multinomial(q_rows, 1, generator=gen).squeeze(1)
            drafts.append(tok)
            qs.append(q_rows)
            prev = tok
        drafts_t = torch.stack(drafts, 1)  # (N, K)
        contexts = torch.cat([last.unsqueeze(1), drafts_t], 1)  # (N, K + 1)
        p = p_table[contexts]  # (N, K + 1, V)
        q = None if deterministic_draft else torch.stack(qs, 1)
        verdict = verify_sampled(p, q, drafts_t, generator=gen)
        n = verdict.num_accepted
        nxt = verdict.next_token
        if contaminate:  # a deliberately wrong sampler: on some steps, after a rejection,
            # the next token comes from p instead of the residual norm(max(0, p - q))
            bad = torch.rand(N, generator=gen) < contaminate
            from_p = torch.multinomial(p[rows, n], 1, generator=gen).squeeze(1)
            nxt = torch.where(bad & (n < K), from_p, nxt)
        emitted = torch.cat([drafts_t, torch.zeros(N, 1, dtype=torch.long)], 1)
        emitted.scatter_(1, n.unsqueeze(1), nxt.unsqueeze(1))
        j = torch.arange(K + 1)
        valid = j < (n + 1).unsqueeze(1)  # (N, K + 1)
        pos = lengths.unsqueeze(1) + j
        buf[rows.unsqueeze(1).expand_as(pos)[valid], pos[valid]] = emitted[valid]
        lengths += n + 1
        last = buf[rows, lengths - 1]
    return buf[:, :M]


def _joint(p_table):
    """Exact target probability of every length-M sequence, in code order (V**M,)."""
    grid = torch.cartesian_prod(*[torch.arange(V)] * M)  # (V**M, M)
    return (
        p_table[V, grid[:, 0]] * p_table[grid[:, 0], grid[:, 1]] * p_table[grid[:, 1], grid[:, 2]]
    ).double()


def _chi_square(counts, expected):
    """Pearson statistic and its 1 - 1e-4 critical value; inf if an impossible cell was hit."""
    keep = expected > 0
    if counts[~keep].sum() > 0:
        return math.inf, 0.0
    e = expected[keep] * counts.sum()
    stat = float(((counts[keep] - e) ** 2 / e).sum())
    dof = int(keep.sum()) - 1
    z = 3.719  # standard normal quantile at 1 - 1e-4; Wilson-Hilferty for the chi-square one
    critical = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    return stat, critical


def _counts(samples):
    codes = (samples * torch.tensor([V**2, V, 1])).sum(1)
    return torch.bincount(codes, minlength=V**M).double()


@pytest.mark.parametrize("deterministic_draft", [False, True], ids=["sampled", "point-mass"])
def test_joint_distribution_equals_target(deterministic_draft):
    p_table, q_table = _tables(0)
    gen = torch.Generator().manual_seed(1234)
    samples = _run_chains(p_table, q_table, deterministic_draft=deterministic_draft, gen=gen)
    stat, critical = _chi_square(_counts(samples), _joint(p_table))
    assert stat < critical, f"chi-square {stat:.1f} >= {critical:.1f}: distribution differs"


def test_chi_square_detects_a_one_percent_bias():
    """At N draws the test rejects a distribution 1% (total variation) away from the target:
    1% of the mass moved from the most likely sequence to one of median probability."""
    p_table, _ = _tables(0)
    joint = _joint(p_table)
    live = torch.nonzero(joint > 0).squeeze(1)
    order = live[joint[live].argsort()]
    a, b = order[-1], order[len(order) // 2]
    biased = joint.clone()
    biased[a] -= 0.01
    biased[b] += 0.01
    draws = torch.multinomial(
        biased.float(), N, replacement=True, generator=torch.Generator().manual_seed(0)
    )
    stat, critical = _chi_square(torch.bincount(draws, minlength=V**M).double(), joint)
    assert stat > critical, f"chi-square {stat:.1f} <= {critical:.1f}: 1% bias not detected"


def test_chi_square_detects_a_residual_bug_on_two_percent_of_steps():
    """A sampler that, on 2% of the steps, draws the token after a rejection from p instead of
    norm(max(0, p - q)) is rejected too."""
    p_table, q_table = _tables(0)
    gen = torch.Generator().manual_seed(1234)
    samples = _run_chains(p_table, q_table, deterministic_draft=False, gen=gen, contaminate=0.02)
    stat, critical = _chi_square(_counts(samples), _joint(p_table))
    assert stat > critical, f"chi-square {stat:.1f} <= {critical:.1f}: bug not detected"
