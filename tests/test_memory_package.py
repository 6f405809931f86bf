"""The memory package's layout: one definition of each thing, the service reading sizes as the
agent does, and imports that stay light."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import edge_agent.memory.budget as budget
from edge_agent.memory import parse_size_mb
from fedmq import service
from fedmq.service import parse_memory

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "edge_agent" / "memory"
MODULES = [*sorted(PACKAGE.glob("*.py")), REPO / "fedmq" / "service.py"]


def _top_level_names(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update(n.id for n in ast.walk(target) if isinstance(n, ast.Name))
    return names - {"__all__", "log"}


def test_no_name_is_defined_in_two_modules():
    seen: dict[str, str] = {}
    for path in MODULES:
        for name in _top_level_names(path):
            assert name not in seen, f"{name} is defined in both {seen[name]} and {path.name}"
            seen[name] = path.name


def test_sizes_are_parsed_in_one_place():
    regexes = {p.name: p.read_text().count("re.compile(") for p in MODULES}
    assert sum(regexes.values()) == 1 and regexes["budget.py"] == 1, regexes
    assert service.parse_size is budget.parse_size


def _systemd_mb(value: str, total_mb: float) -> float:
    """MiB of a systemd MemoryMax= value (read independently of the code under test)."""
    if value.endswith("%"):
        return total_mb * float(value[:-1]) / 100
    units = {"K": 1 / 1024, "M": 1.0, "G": 1024.0, "T": 1024.0 ** 2}
    if value[-1] in units:
        return float(value[:-1]) * units[value[-1]]
    return float(value) / 1024 ** 2  # bytes


@pytest.mark.parametrize("value", ["2G", "512M", "80%", 2048, "1.5GiB", "7GB", "3.5G", "0.5K", 300.5])
def test_the_service_cap_is_the_agents_budget(value):
    total = 16384.0
    assert _systemd_mb(parse_memory(value), total) == pytest.approx(parse_size_mb(value, total_mb=total))


@pytest.mark.parametrize("value", ["lots", "-1G", "0", 0, True, None, "150%", "0%", "abc%"])
def test_the_service_and_the_agent_refuse_the_same_sizes(value):
    with pytest.raises(ValueError):
        parse_size_mb(value, total_mb=1000)
    with pytest.raises(service.ConfigError):
        parse_memory(value)


def test_the_package_imports_without_the_ml_stack():
    code = ("import sys, edge_agent.memory, edge_agent.memory.budget; "
            "heavy = [x for x in ('torch', 'transformers', 'numpy', 'psutil', 'pydantic', 'fedmq_protocol') "
            "if x in sys.modules]; assert not heavy, heavy; "
            "names = [getattr(edge_agent.memory, n) for n in edge_agent.memory.__all__]; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
