"""Statistical exactness of speculative sampling, with p-values.

The claim: the tokens emitted by speculative sampling are distributed exactly as tokens sampled
from the target one at a time, jointly over several steps. Checked here by Pearson's chi-square
on a toy vocabulary (``V = 4``, the first ``M = 3`` tokens: 64 cells):

* ``verify``: :func:`llamazh.speculative.verify_sampled` driving ``--chains`` independent
  chains of a first-order Markov target ``P`` and draft ``Q`` (zeros on both sides), ``K = 2``
  drafts per step, for a sampling draft and a deterministic (point-mass) one; plus two
  deliberately wrong samplers that the test must reject (power: a 1% total-variation bias, and
  a residual bug on 2% of the steps);
* ``loop``: :func:`llamazh.speculative.speculative_generate` end to end on two tiny random
  Llamas with a 4-token vocabulary at temperature 0.8 (``--loop-draws`` generations).

The p-value is the chi-square survival function, ``gammaincc(dof / 2, stat / 2)``. A correct
sampler gives p-values spread uniformly on (0, 1); a wrong one gives p ~ 0.

Run: ``PYTHONPATH=. python benchmarks/speculative_exactness.py`` (about a minute on 2 cores).
"""

from __future__ import annotations

import argparse

import torch

from llamazh.speculative import speculative_generate, verify_sampled
from llamazh.testing import tiny_llama

V, M, K = 4, 3, 2


def p_value(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int, float]:
    """Pearson chi-square of ``counts`` against ``probs`` -> (statistic, dof, p-value)."""
    keep = probs > 0
    if counts[~keep].sum() > 0:  # a sequence the target cannot produce was produced
        return float("inf"), int(keep.sum()) - 1, 0.0
    expected = probs[keep] * counts.sum()
    stat = float(((counts[keep] - expected) ** 2 / expected).sum())
    dof = int(keep.sum()) - 1
    p = float(torch.special.gammaincc(torch.tensor(dof / 2.0), torch.tensor(stat / 2.0)))
    return stat, dof, p


def markov_tables(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Target and draft transition tables ``(V + 1, V)``; row ``V`` is the start state."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.rand(V + 1, V, generator=gen) ** 2
    q = torch.rand(V + 1, V, generator=gen) ** 2
    p[:, 0], q[:, 1], q[0, 3] = 0.0, 0.0, 0.0
    return p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)


def joint(p: torch.Tensor) -> torch.Tensor:
    """Exact target probability of each length-3 sequence, code ``a V^2 + b V + c``."""
    g = torch.cartesian_prod(*[torch.arange(V)] * M)  # (V**M, M)
    return (p[V, g[:, 0]] * p[g[:, 0], g[:, 1]] * p[g[:, 1], g[:, 2]]).double()


def chains(p_t, q_t, n: int, *, point_mass: bool, gen, residual_bug: float = 0.0):
    """Speculative sampling on ``n`` chains until each has >= M tokens -> (V**M,) counts."""
    rows = torch.arange(n)
    buf = torch.zeros(n, M * (K + 1), dtype=torch.long)
    length = torch.zeros(n, dtype=torch.long)
    last = torch.full((n,), V)
    for _ in range(M):  # every step emits at least one token
        drafts, qs, prev = [], [], last
        for _ in range(K):
            q_rows = q_t[prev]  # (n, V)
            tok = (
                q_rows.argmax(-1)
                if point_mass
                else torch.multinomial(q_rows, 1, generator=gen).squeeze(1)
            )
            drafts.append(tok)
            qs.append(q_rows)
            prev = tok
        d = torch.stack(drafts, 1)  # (n, K)
        p = p_t[torch.cat([last.unsqueeze(1), d], 1)]  # (n, K + 1, V)
        verdict = verify_sampled(p, None if point_mass else torch.stack(qs, 1), d, generator=gen)
        acc, nxt = verdict.num_accepted, verdict.next_token
        if residual_bug:  # wrong on purpose: after a rejection, sometimes sample from p
            bad = (torch.rand(n, generator=gen) < residual_bug) & (acc < K)
            nxt = torch.where(bad, torch.multinomial(p[rows, acc], 1, generator=gen)[:, 0], nxt)
        emitted = torch.cat([d, torch.zeros(n, 1, dtype=torch.long)], 1)
        emitted.scatter_(1, acc.unsqueeze(1), nxt.unsqueeze(1))
        j = torch.arange(K + 1)
        valid = j < (acc + 1).unsqueeze(1)  # (n, K + 1)
        pos = length.unsqueeze(1) + j
        buf[rows.unsqueeze(1).expand_as(pos)[valid], pos[valid]] = emitted[valid]
        length += acc + 1
        last = buf[rows, length - 1]
    codes = (buf[:, :M] * torch.tensor([V * V, V, 1])).sum(1)
    return torch.bincount(codes, minlength=V**M).double()


def loop_counts(draws: int, temperature: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """End to end: counts of the first 3 tokens of ``speculative_generate`` and the exact
    target probabilities (from one batched forward over all 64 continuations)."""
    cfg = dict(vocab_size=V, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    target = tiny_llama(5, **cfg)
    draft = tiny_llama(6, num_hidden_layers=1, **cfg)
    ids = torch.tensor([[1, 3, 0]])
    with torch.no_grad():
        grid = torch.cartesian_prod(*[torch.arange(V)] * M)  # (64, 3)
        seqs = torch.cat([ids.expand(len(grid), -1), grid], 1)
        logp = (target(seqs).logits[:, 2:5].float() / temperature).log_softmax(-1)
        probs = logp.gather(2, grid.unsqueeze(-1)).squeeze(-1).sum(1).exp().double()
    gen = torch.Generator().manual_seed(seed)
    counts = torch.zeros(V**M, dtype=torch.float64)
    for _ in range(draws):
        out = speculative_generate(
            target,
            draft,
            ids,
            max_new_tokens=M,
            num_draft_tokens=K,
            do_sample=True,
            temperature=temperature,
            generator=gen,
        )
        a, b, c = out.new_tokens[0].tolist()
        counts[a * V * V + b * V + c] += 1
    return counts, probs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--chains", type=int, default=1 << 20)
    parser.add_argument("--loop-draws", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=1234)
    args = parser.parse_args()
    torch.set_num_threads(1)

    p_t, q_t = markov_tables(0)
    exact = joint(p_t)
    rows = []
    for name, kw in (
        ("verify_sampled, sampling draft", dict(point_mass=False)),
        ("verify_sampled, point-mass draft", dict(point_mass=True)),
        ("WRONG: residual from p on 2% of steps", dict(point_mass=False, residual_bug=0.02)),
    ):
        gen = torch.Generator().manual_seed(args.seed)
        rows.append(
            (name, args.chains, *p_value(chains(p_t, q_t, args.chains, gen=gen, **kw), exact))
        )
    # power: draws from a distribution 1% (total variation) away from the target
    live = torch.nonzero(exact > 0).squeeze(1)
    order = live[exact[live].argsort()]
    biased = exact.clone()
    biased[order[-1]] -= 0.01
    biased[order[len(order) // 2]] += 0.01
    draws = torch.multinomial(
        biased.float(), args.chains, replacement=True, generator=torch.Generator().manual_seed(0)
    )
    counts = torch.bincount(draws, minlength=V**M).double()
    rows.append(("WRONG: 1% total-variation bias", args.chains, *p_value(counts, exact)))
    if args.loop_draws:
        counts, probs = loop_counts(args.loop_draws, 0.8, args.seed)
        rows.append(("speculative_generate, T=0.8", args.loop_draws, *p_value(counts, probs)))

    print(f"joint distribution of the first {M} tokens, V={V} ({V**M} cells), K={K} drafts/step")
    print("| sampler | draws | chi-square | dof | p-value |")
    print("|---|---|---|---|---|")
    for name, n, stat, dof, p in rows:
        print(f"| {name} | {n} | {stat:.1f} | {dof} | {p:.3g} |")


if __name__ == "__main__":
    main()
