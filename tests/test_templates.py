"""The prompt template (agent config ``data.template``): auto, chat, plain, a format string."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from edge_agent.config import DataConfig
from edge_agent.data import PROMPT_TEMPLATE, Example, check_template, parse_record, template_kind
from edge_agent.methods import get_method
from edge_agent.methods.causal_lm import chat_token_ids, resolve_template
from edge_agent.models import build_family_tokenizer, build_tiny_tokenizer, fedmq_home
from fedmq_protocol.messages import AdapterSpec, DeviceStatus

SPEC = AdapterSpec(r=4, alpha=8.0)
EX = Example("What is 2 + 3?", "5")


def test_template_values(tmp_path):
    for v in ("auto", "chat", "plain", "Q: {prompt}\nA: ", "{{literal}} {prompt}"):
        assert check_template(v) == v
    for bad in ("plain text", "{question}", "{prompt} {0}", "{prompt"):
        with pytest.raises(ValueError):
            check_template(bad)
    assert [template_kind(v) for v in ("auto", "chat", "plain", "Q: {prompt}")] == ["auto", "chat", "plain", "custom"]
    train = tmp_path / "t.jsonl"
    train.write_text('{"prompt": "a", "response": "b"}\n')
    assert DataConfig(train=train).template == "auto"
    assert DataConfig(train=train, template="chat").template == "chat"
    with pytest.raises(ValidationError, match="prompt"):
        DataConfig(train=train, template="nothing here")


def test_resolution_by_tokenizer():
    plain, chat = build_tiny_tokenizer(), build_family_tokenizer("tiny-qwen2")
    assert resolve_template("auto", plain) == ("plain", PROMPT_TEMPLATE)  # no chat template: plain
    assert resolve_template("auto", chat) == ("chat", PROMPT_TEMPLATE)
    assert resolve_template("plain", chat) == ("plain", PROMPT_TEMPLATE)
    assert resolve_template("Q: {prompt}\nA: ", chat) == ("custom", "Q: {prompt}\nA: ")
    with pytest.raises(ValueError, match="no chat template"):
        resolve_template("chat", plain)


@pytest.mark.parametrize("family,answer", [
    ("tiny-qwen2", "5<|im_end|>"), ("tiny-gemma", "5<end_of_turn>"), ("tiny-phi3", "5<|end|>\n<|endoftext|>"),
])
def test_chat_labels_are_answer_and_end_of_turn(family, answer):
    tok = build_family_tokenizer(family)
    p, r = chat_token_ids(tok, EX)
    assert tok.decode(p) == tok.apply_chat_template([{"role": "user", "content": EX.prompt}], tokenize=False,
                                                    add_generation_prompt=True)
    assert tok.decode(r) == answer
    # a chat record keeps its system turn
    rec = parse_record({"messages": [{"role": "system", "content": "be brief"},
                                     {"role": "user", "content": "What is 2 + 3?"},
                                     {"role": "assistant", "content": "5"}]}, "x")
    assert rec == Example("be brief\n\nWhat is 2 + 3?", "5")  # the plain template's text is unchanged
    p2, r2 = chat_token_ids(tok, rec)
    assert "be brief" in tok.decode(p2) and tok.decode(p2).count("What is 2 + 3?") == 1 and r2 == r


def test_smollm2_tokenizer_labels():
    path = fedmq_home() / "models" / "smollm2-135m"
    if not (path / "tokenizer.json").is_file():
        pytest.skip("SmolLM2 is not in the model cache (fedmq fetch smollm2-135m)")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    assert resolve_template("auto", tok)[0] == "chat"
    p, r = chat_token_ids(tok, EX)
    assert tok.decode(r) == "5<|im_end|>" and r[-1] == tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.decode(p).endswith("<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")


def test_trainer_masks_labels_per_template(tiny_family):
    qwen = get_method("lora")(tiny_family("tiny-qwen2"), SPEC, device="cpu", seed=0)
    assert qwen.template == "chat"
    ids, labels = qwen._encode(EX, 512)
    kept = [t for t in labels if t != -100]
    assert qwen.tokenizer.decode(kept) == "5<|im_end|>"
    assert labels == [-100] * (len(ids) - len(kept)) + ids[len(ids) - len(kept):]
    custom = get_method("lora")(tiny_family("tiny-qwen2"), SPEC, device="cpu", seed=0, template="Q: {prompt}\nA: ")
    ids, labels = custom._encode(EX, 512)
    assert custom.template == "custom" and custom.tokenizer.decode(ids) == "Q: What is 2 + 3?\nA: 5<|im_end|>"
    assert custom.tokenizer.decode([t for t in labels if t != -100]) == "5<|im_end|>"
    llama = get_method("lora")(tiny_family("tiny-llama"), SPEC, device="cpu", seed=0)
    assert llama.template == "plain"  # no chat template: falls back to plain
    ids, labels = llama._encode(EX, 512)
    assert llama.tokenizer.decode(ids) == "### Instruction:\nWhat is 2 + 3?\n### Response:\n5</s>"


def test_status_carries_the_template():
    st = DeviceStatus(device_id="d", online=True, seq=1, template="chat")
    assert json.loads(st.to_json())["template"] == "chat"
    assert DeviceStatus.from_json(st.to_json()).template == "chat"
    assert DeviceStatus(device_id="d", online=True, seq=1).template is None
