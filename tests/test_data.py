from __future__ import annotations

import json

import pytest

from edge_agent.data import (
    DEFAULT_FAMILIES,
    DataError,
    Example,
    assign_families,
    check_answer,
    format_prompt,
    load_jsonl,
    synthesize,
)


def _read(p):
    return p.read_bytes()


def test_synthesize_is_deterministic(tmp_path):
    m1 = synthesize(tmp_path / "a", seed=7, samples_per_device=50, eval_samples=30)
    m2 = synthesize(tmp_path / "b", seed=7, samples_per_device=50, eval_samples=30)
    synthesize(tmp_path / "c", seed=8, samples_per_device=50, eval_samples=30)
    assert m1 == m2
    for name in ["device_0.jsonl", "device_1.jsonl", "device_2.jsonl", "eval.jsonl", "manifest.json"]:
        assert _read(tmp_path / "a" / name) == _read(tmp_path / "b" / name)
    assert _read(tmp_path / "a" / "device_0.jsonl") != _read(tmp_path / "c" / "device_0.jsonl")


def test_synthesize_manifest_and_non_iid_split(tmp_path):
    m = synthesize(tmp_path, num_devices=3, samples_per_device=40, eval_samples=21, seed=0)
    assert len(DEFAULT_FAMILIES) >= 5
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest == m and manifest["seed"] == 0
    fam_sets = []
    for d in m["devices"]:
        exs = load_jsonl(tmp_path / d["file"])
        assert len(exs) == d["num_samples"] == 40
        fams = {e.family for e in exs}
        assert fams == set(d["families"])
        fam_sets.append(fams)
    # disjoint family sets per device, covering all families
    assert all(a.isdisjoint(b) for i, a in enumerate(fam_sets) for b in fam_sets[i + 1:])
    assert set().union(*fam_sets) == set(DEFAULT_FAMILIES)
    ev = load_jsonl(tmp_path / "eval.jsonl")
    assert len(ev) == 21 and {e.family for e in ev} == set(DEFAULT_FAMILIES)


def test_more_devices_than_families_share_families(tmp_path):
    m = synthesize(tmp_path, num_devices=5, samples_per_device=10, eval_samples=10,
                   families=["add", "reverse"], seed=1)
    assert [d["families"] for d in m["devices"]] == [["add"], ["reverse"], ["add"], ["reverse"], ["add"]]
    assert assign_families(["a", "b", "c", "d", "e"], 2) == [["a", "c", "e"], ["b", "d"]]
    with pytest.raises(ValueError, match="unknown task families"):
        synthesize(tmp_path / "x", families=["nope"])


def test_eval_prompts_held_out_where_possible(tmp_path):
    synthesize(tmp_path, num_devices=1, samples_per_device=200, eval_samples=50, seed=2,
               families=["add", "max", "sort"])
    ev = {e.prompt for e in load_jsonl(tmp_path / "eval.jsonl")}
    train = {e.prompt for e in load_jsonl(tmp_path / "device_0.jsonl")}
    assert not ev & train


def test_check_answer_on_synthesized_examples(tmp_path):
    synthesize(tmp_path, num_devices=2, samples_per_device=100, eval_samples=80, seed=4,
               families=[*DEFAULT_FAMILIES, "first_letter"])
    exs = load_jsonl(tmp_path / "eval.jsonl")
    for e in exs:
        assert check_answer(e, e.response), e
        assert check_answer(e, f"  {e.response}\nsome rambling after"), e
        assert check_answer(e, e.response + "</s>"), e
        assert not check_answer(e, ""), e
        assert not check_answer(e, "zz" + e.response + "9"), e
    add = Example("What is 2 + 3?", "5", "add")
    assert check_answer(add, "5.") and not check_answer(add, "6") and not check_answer(add, "five")
    srt = Example("Sort ascending: 3 1 2", "1 2 3", "sort")
    assert check_answer(srt, "1, 2, 3") and not check_answer(srt, "1 3 2")
    up = Example("Uppercase: red fox", "RED FOX", "upper")
    assert not check_answer(up, "red fox")
    free = Example("hi", "hello there")
    assert check_answer(free, "hello there") and not check_answer(free, "hello")


def test_format_prompt_template():
    assert format_prompt("Do X") == "### Instruction:\nDo X\n### Response:\n"


def test_load_jsonl_all_formats(tmp_path):
    p = tmp_path / "d.jsonl"
    lines = [
        {"prompt": "p1", "response": "r1", "family": "add"},
        {"instruction": "ins", "output": "out"},
        {"instruction": "ins", "input": "ctx", "output": "out2"},
        {"instruction": "ins", "input": "", "output": "out3"},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
                      {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]},
    ]
    p.write_text("\n".join(json.dumps(x) for x in lines[:3]) + "\n\n   \n" +
                 "\n".join(json.dumps(x) for x in lines[3:]) + "\n")
    exs = load_jsonl(p)
    assert exs == [
        Example("p1", "r1", "add"),
        Example("ins", "out"),
        Example("ins\n\nctx", "out2"),
        Example("ins", "out3"),
        Example("be brief\n\nq", "a"),
        Example("User: q1\nAssistant: a1\nq2", "a2"),
    ]


@pytest.mark.parametrize(
    "bad, needle",
    [
        ("{not json", "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"prompt": "x"}', "missing field 'response'"),
        ('{"prompt": "x", "response": 3}', "'response' must be a string"),
        ('{"prompt": "x", "response": "  "}', "'response' is empty"),
        ('{"instruction": "x"}', "missing field 'output'"),
        ('{"messages": [{"role": "user", "content": "q"}]}', "no assistant turn"),
        ('{"messages": []}', "non-empty list"),
        ('{"text": "x"}', "unrecognised record"),
    ],
)
def test_load_jsonl_errors_name_file_and_line(tmp_path, bad, needle):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "a", "response": "b"}\n\n' + bad + "\n")
    with pytest.raises(DataError) as ei:
        load_jsonl(p)
    msg = str(ei.value)
    assert f"{p}:3" in msg and needle in msg
    assert isinstance(ei.value, ValueError)


def test_load_jsonl_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_jsonl(tmp_path / "nope.jsonl")
