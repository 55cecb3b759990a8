"""bench/host_syncs.py: the host reads and host-to-device copies of a pretraining step, counted
on the CPU (each is a point where an accelerator would wait for the host)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from host_syncs import OURS, count  # noqa: E402
from pretrain_throughput import make_steps  # noqa: E402,F401  (the bench's own imports resolve)
from ssl_cases import build_case  # noqa: E402


def test_counter_sees_reads_moves_and_boolean_indexing():
    weight = torch.nn.Parameter(torch.randn(6))  # the step's tensors (its closure) count as on the device

    def step():
        host_mask = torch.tensor([True, False] * 3)
        picked = weight[host_mask.to(weight.device)]   # a move, and an index resolved by a read
        loss = picked.pow(2).sum()
        loss.item()                                    # a read
        loss.backward()                                # the boolean index again, in the backward
        weight.grad = None

    counter = count(step, OURS)
    assert sum(counter.copies.values()) == 1, counter.copies
    assert sum(counter.reads.values()) == 3, counter.reads


def test_counter_ignores_host_only_values():
    weight = torch.nn.Parameter(torch.randn(6))

    def step():
        draws = torch.rand(3)                          # host random numbers, read on the host
        (weight * float(draws.sum())).sum().backward()
        weight.grad = None

    counter = count(step, OURS)
    assert not counter.reads and not counter.copies


@pytest.mark.parametrize("frontend", ["hubert", "wavlm", "w2vbert"])
def test_pretraining_step_reads_the_device_a_handful_of_times(frontend):
    """Logged stats stay on the device, masked frames are picked by one index (no boolean index
    to resolve again in the backward), validity checks read once: 7-8 in all, where reading each
    stat and check made it 20-24 (transformers' step with a linear head: 6)."""
    torch.manual_seed(0)
    case = build_case(frontend, batch=2, seconds=1.0)
    counter = count(case.step_ours, OURS)
    total = sum(counter.reads.values()) + sum(counter.copies.values())
    # at least the span mask's copy to the device and the masked-frame count are always there
    assert sum(counter.copies.values()) >= 1 and 7 <= total <= 8, {**counter.reads, **counter.copies}


def test_padded_w2v_bert_step_reads_no_more_than_an_unpadded_one():
    """With padding, the Conformer blocks' attention bias and masked BatchNorm take the padding
    mask as it is (no per-block "any padding?" or selection of real frames)."""
    torch.manual_seed(0)
    model = build_case("w2vbert", batch=2, seconds=1.0).ours
    fbank = torch.randn(2, 100, 80)

    def totals(lengths):
        def step():
            loss, _ = model(fbank, lengths)
            loss.backward()
            model.zero_grad(set_to_none=True)
        counter = count(step, OURS)
        return sum(counter.reads.values()) + sum(counter.copies.values())

    padded, unpadded = totals(torch.tensor([100, 64])), totals(torch.tensor([100, 100]))
    assert 0 < padded <= unpadded <= 8, (padded, unpadded)
