"""Draft-length schedules on synthetic measurements; the cost gate end to end with a slow,
useless drafter (output still exact, almost every step plain)."""

from __future__ import annotations

import time

import pytest
import torch

from llamazh.speculative import Draft, speculative_generate
from llamazh.speculative.schedule import CostGate, make_schedule
from llamazh.testing import tiny_llama

PLAIN, VERIFY, DRAFT = 1.0, 1.1, 0.3  # seconds: a plain step, a verify step, one drafted token


def _run(gate: CostGate, steps: int, accept) -> list[int]:
    """Feed ``gate`` ``steps`` steps with ``accept(k)`` accepted tokens; return the k asked."""
    asked = []
    for _ in range(steps):
        k = gate.k
        asked.append(k)
        if k:
            n = accept(k)
            gate.update(k, k, n, k * DRAFT, k * DRAFT + VERIFY)
        else:
            gate.update(0, 0, 0, 0.0, PLAIN)
    return asked


def test_cost_gate_stops_a_useless_draft_and_probes_rarely():
    asked = _run(CostGate(4, 16), 200, lambda k: 0)
    assert asked[0] == 1 and asked[1] == 0  # the first step is a one-token probe
    probes = [i for i, k in enumerate(asked) if k]
    assert probes == [0, 17, 50, 115]  # backoff 16, 32, 64 plain steps
    assert all(asked[i] == CostGate.probe_tokens for i in probes)


def test_cost_gate_keeps_a_good_draft_and_comes_back_after_a_bad_patch():
    gate = CostGate(4, 16)
    asked = _run(gate, 10, lambda k: k)  # everything accepted: the heuristic grows k
    assert 0 not in asked and asked[:3] == [1, 6, 8] and asked[-1] == 16
    asked = _run(gate, 6, lambda k: 0)  # a patch where nothing is accepted closes the gate
    assert 0 in asked
    asked = _run(gate, 40, lambda k: k)  # the next probe pays: drafting is back for good
    first = next(i for i, k in enumerate(asked) if k)
    assert all(asked[first:]) and asked[-1] == 16 and gate.backoff == CostGate.first_backoff


def test_throughput_schedule_prefers_long_drafts_when_they_pay():
    schedule = make_schedule("throughput", 4, 12)
    for _ in range(20):
        schedule.update(schedule.k, schedule.k, schedule.k, 0.01 * schedule.k, 1.0)
    assert schedule.k == 12


class _SlowNoise:
    """A drafter that takes 250 ms (far above any timing noise) and always proposes token 0,
    which the target never picks here (checked against its greedy output)."""

    calls = 0

    def draft(self, input_ids, num_tokens, sampling, generator):
        self.calls += 1
        time.sleep(0.25)
        return Draft(torch.zeros(1, num_tokens, dtype=torch.long), None)


def test_auto_schedule_with_a_useless_slow_drafter_is_exact_and_mostly_plain(hf_greedy):
    target = tiny_llama(0)
    ids = torch.tensor([[5, 9, 11, 200, 17]])
    want = hf_greedy(target, ids, 60, eos_token_id=[])
    assert 0 not in want[0, 5:].tolist()
    drafter = _SlowNoise()
    out = speculative_generate(target, drafter, ids, max_new_tokens=60, eos_token_id=[])
    assert out.sequences.tolist() == want.tolist()
    assert drafter.calls <= 4 and out.accepted == 0


@pytest.mark.parametrize("name", ["auto", "adaptive", "constant", "throughput"])
def test_every_schedule_starts_at_num_draft_tokens(name):
    assert make_schedule(name, 3, 9).k == (1 if name == "auto" else 3)
