"""The agent's federation modes and its runtime: lookup by mode name, configuration, layering
(the runtime names no mode, imports neither the coordinator nor the ML stack, no import cycles),
the trainer registry, and the update packed once."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest

from edge_agent.config import AgentConfig
from edge_agent.modes import AgentMode, mode_class
from fedmq_protocol import messages as m
from fedmq_protocol.modes import MODES

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "edge_agent"


def _cfg(tmp_path, **extra) -> AgentConfig:
    tmp_path.mkdir(parents=True, exist_ok=True)
    train = tmp_path / "train.jsonl"
    train.write_text('{"prompt": "a", "response": "b"}\n')
    return AgentConfig(device_id="dev-0", model="tiny-llama", data={"train": train}, state_dir=tmp_path / "st",
                       federation="test", **extra)


def test_every_registered_mode_has_an_agent_side():
    from edge_agent.methods import get_method, is_method

    for name in MODES:
        cls = mode_class(name)
        assert issubclass(cls, AgentMode) and cls.name == name
        # in the registry, or registered by its file alone (edge_agent/methods/<name>.py)
        assert cls.methods and all(is_method(meth) and get_method(meth).name == meth for meth in cls.methods)
    with pytest.raises(ValueError, match=r"valid: adapter, kd, krso, split, zo$"):
        mode_class("fedkrso")


def test_the_mode_follows_the_method_unless_configured(tmp_path):
    from fedmq.configfile import ConfigError, validate_config

    assert _cfg(tmp_path).mode == "adapter" and _cfg(tmp_path, method="qlora").mode == "adapter"
    assert _cfg(tmp_path, method="zo").mode == "zo" and _cfg(tmp_path, method="zo", mode="zo").mode == "zo"
    base = {"device_id": "d", "model": "tiny-llama", "data": {"train": str(_cfg(tmp_path).data.train)}}
    with pytest.raises(ConfigError, match="mode zo trains with method zo, not 'lora'"):
        validate_config({**base, "mode": "zo"}, AgentConfig)
    with pytest.raises(ConfigError, match="unknown federation mode 'nope'"):
        validate_config({**base, "mode": "nope"}, AgentConfig)


def test_agents_of_both_modes_are_built_from_their_config(tmp_path):
    from edge_agent.agent import EdgeAgent, create_agent
    from edge_agent.modes.adapter import AdapterMode
    from edge_agent.modes.zo import ZoMode

    class Stub:
        pass

    assert type(EdgeAgent(_cfg(tmp_path / "a"), transport=Stub()).mode) is AdapterMode  # type: ignore[arg-type]
    zo = create_agent(_cfg(tmp_path / "z", method="zo"), transport=Stub())
    assert type(zo.mode) is ZoMode
    assert [(s.topic, s.kind) for s in zo.mode.subscriptions()] == [("fedmq/test/zo/ledger/+", "ledger")]


def test_method_registry_holds_the_memory_plans_fallback():
    from edge_agent.methods import PLAN_ONLY, REGISTRY, get_method, method_names

    assert "zo-adapter" in REGISTRY and "zo-adapter" in PLAN_ONLY and "zo-adapter" not in method_names()
    cls = get_method("zo-adapter")
    assert cls.name == "zo-adapter" and issubclass(cls, get_method("zo"))


def test_a_method_is_registered_by_its_file_alone(monkeypatch, tmp_path):
    """A new trainer needs no registry edit: edge_agent/methods/<name>.py defining METHOD is found."""
    import importlib

    from edge_agent import methods
    from edge_agent.methods.lora import LoraMethod

    assert methods.is_method("lora") and not methods.is_method("zo-adapter") and not methods.is_method("nope")
    (tmp_path / "subspace_test.py").write_text("from edge_agent.methods.lora import LoraMethod as METHOD\n")
    (tmp_path / "subspace_helper.py").write_text("HELPER = 1\n")
    monkeypatch.setattr(methods, "__path__", [*methods.__path__, str(tmp_path)])
    importlib.invalidate_caches()
    try:
        assert methods.is_method("subspace-test") and methods.get_method("subspace-test") is LoraMethod
        assert not methods.is_method("subspace-helper")  # a module of the package without METHOD
    finally:
        sys.modules.pop("edge_agent.methods.subspace_test", None)
    with pytest.raises(ValueError, match="unknown training method 'nope'"):
        methods.get_method("nope")


def test_a_mode_names_the_method_whose_memory_bounds_its_trainer(tmp_path):
    """The memory planner estimates lora, qlora and zo; a mode with another trainer says which of
    them bounds it (AgentMode.planned_as), and the agent's memory manager plans with that one."""
    from edge_agent.agent import EdgeAgent
    from edge_agent.modes.adapter import AdapterMode

    class Stub:
        pass

    agent = EdgeAgent(_cfg(tmp_path), transport=Stub())  # type: ignore[arg-type]
    assert agent.memory.method == "lora" and AdapterMode.planned_as(agent.mode, "lora") == "lora"

    class Subspace(AdapterMode):
        def planned_as(self, method: str) -> str:
            return "qlora"

    ctx = agent.mode.ctx
    from edge_agent.memory import MemoryManager

    assert MemoryManager(ctx.config, method=Subspace(ctx).planned_as("lora")).method == "qlora"


def test_the_batch_sampler_draws_without_replacement_and_reshuffles_each_pass():
    import random

    from edge_agent.methods.base import BatchSampler

    s = BatchSampler(5, 2, seed=7)
    drawn = [s.next() for _ in range(5)]
    assert all(len(b) == 2 for b in drawn)
    flat = [i for b in drawn for i in b]
    assert sorted(flat[:5]) == list(range(5)) and sorted(flat[5:10]) == list(range(5))
    # the order of the loop the methods ran before: random.Random(seed), shuffled per pass, popped
    rng, order, ref = random.Random(7), [], []
    for _ in range(10):
        if not order:
            order = list(range(5))
            rng.shuffle(order)
        ref.append(order.pop())
    assert flat == ref
    assert BatchSampler(3, 8, seed=0).next() != []  # a batch larger than the data: all of it
    assert len(BatchSampler(3, 8, seed=0).next()) == 3


@pytest.mark.parametrize("signed", [False, True])
def test_an_update_is_packed_once_into_the_bytes_of_its_map(tmp_path, signed):
    """The update is the msgpack map itself (the metrics and signature packed in place last)."""
    from edge_agent.updates import UpdateBuilder
    from edge_agent.uplink import UplinkConfig, UplinkEncoder
    from fedmq_protocol.signing import Signer, Verifier, generate_keypair, load_public_key

    signer = None
    if signed:
        pem, pub = generate_keypair()
        (tmp_path / "k.key").write_bytes(pem)
        signer = Signer.from_file(tmp_path / "k.key")
    builder = UpdateBuilder("dev-0", "test", UplinkEncoder(UplinkConfig(), 4096, tmp_path), signer)
    task = m.Task(kind="fit", task_id="r1-fit-v0-a0", round=1, device_id="dev-0", global_version=0, deadline_s=60,
                  adapter=m.AdapterSpec(), nonce=b"n" * 16)
    rng = np.random.default_rng(0)
    delta = {"a.lora_A.weight": rng.standard_normal((8, 64)).astype(np.float32),
             "a.lora_B.weight": rng.standard_normal((64, 8)).astype(np.float32)}
    data = builder.build(task, 0, 12, {"train_loss": 1.5, "bad": float("inf")}, delta)
    obj = msgpack.unpackb(data, raw=False)
    assert msgpack.packb(obj, use_bin_type=True) == data
    assert len(data) <= 4096 and obj["metrics"]["uplink_bytes"] == len(data)
    assert list(obj["metrics"])[-2:] == ["encode_s", "sent_at"] and "bad" not in obj["metrics"]
    assert obj["metrics"]["encode_s"] > 0
    upd = m.Update.from_msgpack(data)
    if signed:
        Verifier({"dev-0": load_public_key(pub)}, "test").verify(upd.to_obj(), task.nonce)
    else:
        assert upd.signature is None and upd.nonce is None


# ------------------------------------------------------------------------------ layering

def _modules() -> dict[str, Path]:
    return {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__"): p
            for p in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> set[str]:
    """Modules ``path`` imports, at its top or lazily inside functions (not for type checking)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree)
                   if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_edge_agent_never_imports_the_coordinator():
    offenders = [f"{name}: {mod}" for name, path in _modules().items() for mod in _imports(path)
                 if mod.split(".")[0] == "broker_coordinator"]
    assert not offenders


def test_no_import_cycles_inside_edge_agent():
    modules = _modules()
    graph = {name: {d for d in _imports(path) if d in modules and d != name}
             for name, path in modules.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail[trail.index(dep):], dep]))
            if dep not in state:
                visit(dep, [*trail, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_runtime_names_no_mode():
    for name in ("agent.py", "updates.py"):
        tree = ast.parse((PACKAGE / name).read_text())
        literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)}
        assert not literals & set(MODES), (name, literals & set(MODES))
        names = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)} | \
            {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        assert not [n for n in names if n.lower().startswith("zo")], name


def test_light_modules_do_not_import_the_ml_stack_or_the_coordinator():
    code = ("import sys, edge_agent.agent, edge_agent.config, edge_agent.updates, edge_agent.modes, "
            "edge_agent.modes.adapter, edge_agent.modes.zo, edge_agent.methods, edge_agent.methods.base; "
            "bad = [x for x in ('torch', 'transformers', 'bitsandbytes', 'peft', 'numba', 'broker_coordinator') "
            "if x in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_a_helper_module_of_the_methods_package_is_not_a_method():
    from edge_agent.methods import is_method

    assert is_method("split") and is_method("kd")  # registered by their files (they define METHOD)
    assert not is_method("split_model") and not is_method("base") and not is_method("causal_lm")
