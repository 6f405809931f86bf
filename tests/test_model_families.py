"""Qwen2, Gemma and Phi-3 (tiny random checkpoints built offline) end to end: the memory planner's
shape, LoRA's target modules, one round through agents and the coordinator's aggregation, and a
zeroth-order fit whose ledger replay gives the same weights on another instance."""

from __future__ import annotations

import numpy as np
import pytest

from broker_coordinator.strategy import FedAvg
from edge_agent.memory.estimator import ModelShape
from edge_agent.methods.zo import ZoMethod
from fedmq_protocol import messages as m
from fedmq_protocol.modes.zo import ZoSpec
from tests.test_memory_budget import FakeTransport
from tests.test_zo import EXAMPLES, FIT, _ledger_round

FAMILIES = ("tiny-qwen2", "tiny-gemma", "tiny-phi3")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("all-linear",)])
def test_shape_counts_the_real_model_and_its_lora(tiny_family, family, targets):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from edge_agent.models import lora_target_modules

    path = tiny_family(family)
    shape = ModelShape.from_path(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert shape.num_params == sum(p.numel() for p in model.parameters())
    lcfg = LoraConfig(r=4, target_modules=lora_target_modules(model.config.model_type, targets))
    peft_model = get_peft_model(model, lcfg)
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert shape.lora_params(4, targets) == lora


@pytest.mark.parametrize("family", FAMILIES)
def test_one_round_agents_to_coordinator(tmp_path, synth, tiny_family, family):
    from edge_agent.agent import create_agent
    from edge_agent.config import AgentConfig

    path = tiny_family(family)
    adapter = m.AdapterSpec(r=4)  # the default target modules (q_proj, v_proj; Phi-3: qkv_proj)
    updates, agents = [], []
    for i in range(2):
        cfg = AgentConfig(device_id=f"dev-{i}", model=path, data={"train": str(synth / f"device_{i}.jsonl")},
                          state_dir=str(tmp_path / f"a{i}"), device="cpu", training={"torch_threads": 1})
        agent = create_agent(cfg, transport=FakeTransport())
        agent.start()
        agent._plan_fit = m.FitConfig(batch_size=4, max_seq_len=64)
        agent._ensure_method(adapter)
        agent.mode.global_arrays, agent.global_version = agent.method.get_state(), 0
        glob = agent.method.get_state()
        task = m.Task(kind="fit", task_id="r1-fit-v0-a0", round=1, device_id=agent.device_id, global_version=0,
                      deadline_s=120, adapter=adapter, fit=m.FitConfig(local_steps=2, batch_size=4, max_seq_len=64,
                                                                       lr=5e-3))
        agent._fit(task)
        (payload,) = agent.transport.updates()
        updates.append(m.Update.from_msgpack(payload))
        assert agent.transport.statuses()[-1].template == "chat"
        agents.append(agent)
    names = set(glob)
    if family == "tiny-phi3":
        assert all(".qkv_proj." in n for n in names)
    else:
        assert {n.split(".")[-3] for n in names} == {"q_proj", "v_proj"}
    delta = FedAvg(min_clients=2).aggregate_deltas(glob, updates)
    assert set(delta) == names
    assert all(np.isfinite(d).all() for d in delta.values()) and any(np.abs(d).max() > 0 for d in delta.values())
    for agent in agents:
        agent.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_zo_fit_replays_to_the_same_weights(tiny_family, tmp_path, family):
    path = tiny_family(family)
    spec = ZoSpec(seed=3, num_seeds=16, eps=1e-2, lr=1e-3, target="full")
    trained = ZoMethod(path, m.AdapterSpec(), device="cpu", target="full", workers=1)
    idle = ZoMethod(path, m.AdapterSpec(), device="cpu", target="full", workers=1)
    assert trained.template == "chat"
    trained.snapshot(tmp_path / "pre.pt")
    res = trained.fit(EXAMPLES, FIT, spec=spec)
    assert res.steps == FIT.local_steps and np.isfinite(res.train_loss)
    assert trained.param_digest() != idle.param_digest()
    entry = _ledger_round(1, spec, [trained.last_pool], [12])
    trained.restore(tmp_path / "pre.pt")
    trained.apply_round(entry)
    idle.apply_round(entry)
    assert trained.param_digest() == idle.param_digest()
