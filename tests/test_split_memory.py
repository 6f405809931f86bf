"""The memory plan of a split device: the estimate of its part of the model, the largest cut
within a budget, and the refusal of a task whose cut the budget cannot hold."""

from __future__ import annotations

import itertools
import math

import pytest

from edge_agent.memory import Budget, BudgetTooSmall, ModelShape, choose_plan, estimate
from edge_agent.memory.estimator import CUT_BUFFERS, estimate_split
from edge_agent.memory.planner import choose_cut, split_cuts
from fedmq_protocol import messages as m
from tests.split_support import build_deep_tiny_llama

# eight blocks and a real vocabulary: the device's blocks, not the runtime alone, move the estimate
DEEP = ModelShape.from_config({"vocab_size": 32000, "hidden_size": 256, "intermediate_size": 688,
                               "num_hidden_layers": 8, "num_attention_heads": 4}, name="deep")
ROUND = {"batch_size": 8, "seq_len": 256}


def _host(h: int, t: int, shape: ModelShape = DEEP) -> float:
    return estimate_split(shape, l_head=h, l_tail=t, micro_batch=ROUND["batch_size"], seq_len=ROUND["seq_len"])[0]


def test_split_estimate_counts_the_device_blocks_and_the_cut_buffers():
    host, gpu, b = estimate_split(DEEP, l_head=2, l_tail=2, micro_batch=8, seq_len=256)
    assert gpu is None and host == pytest.approx(sum(b.values()))
    tokens, h = 8 * 256, DEEP.hidden_size
    assert b["cut_buffers"] == pytest.approx(tokens * h * 4 * CUT_BUFFERS / 2**20)
    # each block more on the device costs its weights, LoRA state, activations and attention, at either end
    steps = [_host(1, 1), _host(2, 1), _host(2, 2), _host(3, 2), _host(3, 3)]
    assert all(a < b for a, b in itertools.pairwise(steps))
    assert _host(2, 1) == pytest.approx(_host(1, 2))
    per_block = _host(2, 2) - _host(2, 1)
    assert _host(3, 3) - _host(2, 2) == pytest.approx(2 * per_block)
    # the device's part is cheaper than on-device LoRA of the whole model (same batch, no checkpointing)
    lora = estimate(DEEP, method="lora", base="float32", micro_batch=8, seq_len=256)[0]
    assert _host(2, 2) < lora
    # the blocks' share: holding all but one block comes close to the whole model's LoRA
    assert lora - _host(4, 3) < 1.5 * per_block
    with pytest.raises(ValueError, match="at least one block left for the split server"):
        estimate_split(DEEP, l_head=4, l_tail=4, micro_batch=1, seq_len=8)


def test_cuts_are_ordered_largest_first_and_keep_the_u_shape():
    cuts = split_cuts(DEEP, 2, 2)
    assert cuts == [(2, 2), (2, 1), (1, 2), (1, 1)]
    assert all(t >= 1 for _, t in split_cuts(DEEP, 5, 5)) and (4, 3) in split_cuts(DEEP, 5, 5)
    assert all(h + t < DEEP.num_layers for h, t in split_cuts(DEEP, 5, 5))


def test_the_largest_cut_that_fits_the_budget_is_chosen():
    kwargs = {"l_head": 3, "l_tail": 3, **ROUND}
    assert choose_cut(DEEP, Budget(), **kwargs).cut == (3, 3)
    # between the estimates of a 5-block and a 6-block device part: the 5-block cut, more at the head
    budget = Budget(host_mb=(_host(3, 2) + _host(3, 3)) / 2)
    plan = choose_cut(DEEP, budget, **kwargs)
    assert plan.cut == (3, 2) and plan.fits(budget) and plan.method == "split"
    assert plan.micro_batch == ROUND["batch_size"] and plan.grad_accum == 1
    assert "split l_head=3 l_tail=2" in plan.label()
    budget = Budget(host_mb=_host(2, 2) + 0.01)
    assert choose_cut(DEEP, budget, **kwargs).cut == (2, 2)


def test_a_task_cut_over_budget_is_refused_naming_the_largest_cut_that_fits():
    budget = Budget(host_mb=_host(2, 1) + 0.01)
    with pytest.raises(BudgetTooSmall) as exc:
        choose_plan(DEEP, budget, method="split", cut=(2, 2), **ROUND)
    msg = str(exc.value)
    assert "memory budget" in msg and f"{budget.host_mb:.0f}" in msg.replace(",", "")
    assert f"host_mb: {exc.value.min_host_mb}" in msg and exc.value.min_host_mb >= _host(2, 2)
    assert "the largest cut that fits is l_head=2 l_tail=1" in msg


def test_a_budget_that_holds_no_cut_is_refused_with_the_budget_it_needs():
    tiny = Budget(host_mb=_host(1, 1) - 1)
    with pytest.raises(BudgetTooSmall, match=r"the smallest plan \(split l_head=1 l_tail=1") as exc:
        choose_cut(DEEP, tiny, l_head=2, l_tail=2, **ROUND)
    assert exc.value.min_host_mb == pytest.approx(_host(1, 1), abs=1)
    with pytest.raises(BudgetTooSmall, match="no smaller cut fits either"):
        choose_plan(DEEP, tiny, method="split", cut=(2, 2), **ROUND)


def test_a_split_agent_declines_a_task_whose_cut_exceeds_its_budget(tmp_path, synth):
    from edge_agent.agent import create_agent
    from edge_agent.config import AgentConfig
    from edge_agent.memory import PlanRefused
    from fedmq_protocol.modes.split import SplitSpec
    from tests.test_memory_budget import FakeTransport

    model = build_deep_tiny_llama(tmp_path / "model", layers=6)
    shape = ModelShape.from_path(model)
    fit = m.FitConfig(batch_size=8, max_seq_len=64)

    def need(h: int, t: int) -> float:
        return estimate_split(shape, l_head=h, l_tail=t, micro_batch=8, seq_len=64)[0]

    keep = 0.95  # the default safety margin of memory_budget
    cfg = AgentConfig(device_id="dev-s", model=model, data={"train": str(synth / "device_0.jsonl")},
                      state_dir=str(tmp_path / "state"), device="cpu", method="split",
                      training={"torch_threads": 1},
                      memory_budget={"host_mb": (need(2, 1) + need(2, 2)) / 2 / keep})
    agent = create_agent(cfg, transport=FakeTransport())
    agent.start()
    try:
        assert agent.transport.statuses()[-1].memory.plan is None  # no task has named a cut yet
        agent._plan_fit = fit
        agent.mode.spec = SplitSpec(l_head=2, l_tail=2)
        with pytest.raises(PlanRefused, match="the largest cut that fits is l_head=2 l_tail=1"):
            agent._ensure_method(m.AdapterSpec(r=4))
        st = agent.transport.statuses()[-1]
        assert st.state == "refused" and agent.method is None
        assert "split l_head=2 l_tail=2" in st.memory.refused and st.memory.min_host_mb >= need(2, 2)
        # the cut that fits is planned and loaded
        agent.mode.spec = SplitSpec(l_head=2, l_tail=1)
        method = agent._ensure_method(m.AdapterSpec(r=4))
        assert (method.l_head, method.l_tail) == (2, 1)
        plan = agent.memory.plan
        assert plan is not None and plan.cut == (2, 1) and plan.estimate_host_mb == pytest.approx(need(2, 1), rel=1e-3)
    finally:
        agent.close()


def test_split_plan_command_prints_the_largest_cut_for_a_budget(tmp_path, capsys):
    from fedmq.cli import main

    model = build_deep_tiny_llama(tmp_path / "model", layers=6)
    shape = ModelShape.from_path(model)

    def need(h: int, t: int) -> float:
        return estimate_split(shape, l_head=h, l_tail=t, micro_batch=8, seq_len=64)[0]

    args = ["split-plan", "--model", model, "--l-head", "2", "--l-tail", "2", "--batch-size", "8", "--seq-len", "64"]
    budget = (need(2, 1) + need(2, 2)) / 2 / 0.95  # the default safety margin of memory_budget
    assert main([*args, "--memory-budget", f"{budget:.1f}M"]) == 0
    out = capsys.readouterr().out
    assert "split:\n  l_head: 2\n  l_tail: 1\n" in out and "the split server runs 3 of 6 blocks" in out
    assert main([*args, "--memory-budget", "64M"]) == 1
    err = capsys.readouterr().err
    assert "no cut of at most l_head=2 l_tail=2 fits memory budget 64 MiB" in err
    assert "smallest is split l_head=1 l_tail=1" in err
    assert f"host_mb: {math.ceil(math.ceil(need(1, 1)) / 0.95)}" in err
