"""The model split: head, middle and tail parts chained in one process are the unsplit model."""

from __future__ import annotations

import pytest
import torch

from edge_agent.methods.lora import LoraMethod
from edge_agent.methods.split_model import Cut, load_part, response_loss
from fedmq_protocol.messages import AdapterSpec
from tests.split_support import build_deep_tiny_llama
from tests.tiny_model import ALL_LINEAR


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory) -> str:
    return build_deep_tiny_llama(tmp_path_factory.mktemp("deep-llama"), layers=5)


def _batch(tok, texts):
    ids = [tok(t)["input_ids"] for t in texts]
    width = max(map(len, ids))
    input_ids = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    labels = torch.full((len(ids), width), -100, dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
        labels[i, 3:len(row)] = torch.tensor(row[3:])  # a "prompt" of 3 tokens; padding unlabelled
    return input_ids, mask, labels


def test_cut_ranges_and_refusals():
    cut = Cut(30, 2, 2)
    assert cut.device_layers == [0, 1, 28, 29] and cut.server_layers == list(range(2, 28))
    with pytest.raises(ValueError, match="leave no block"):
        Cut(4, 2, 2)
    with pytest.raises(ValueError, match="l_head must be >= 1"):
        Cut(4, 0, 1)


def test_split_forward_backward_equals_the_unsplit_model(deep_llama):
    """Same weights, same LoRA init, same padded batch: the loss and every LoRA gradient of the
    chained parts equal the unsplit model's (LoraMethod, the on-device trainer) within float tolerance."""
    adapter = AdapterSpec(r=4, alpha=8, target_modules=ALL_LINEAR)
    full = LoraMethod(deep_llama, adapter, device="cpu", seed=3)
    # LoRA B starts at zero: move it so the adapter changes the function and gets gradients on A too
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for name, p in full._params.items():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    state = full.get_state()
    tok, dev, dparams, cut = load_part(deep_llama, adapter, l_head=1, l_tail=2, side="device", seed=3)
    _, srv, sparams, _ = load_part(deep_llama, adapter, l_head=1, l_tail=2, side="server", seed=3)
    assert cut.device_layers == [0, 3, 4] and cut.server_layers == [1, 2]
    # the parts' adapters partition the unsplit one, by name
    assert set(dparams) | set(sparams) == set(state) and not set(dparams) & set(sparams)
    with torch.no_grad():
        for params in (dparams, sparams):
            for n, p in params.items():
                p.copy_(torch.from_numpy(state[n]))
    input_ids, mask, labels = _batch(tok, ["hello split world", "a longer sentence for the padding", "x"])

    ref = full.model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
    ref.backward()

    # the message flow of one split step, in process: activations cross detached, as on the wire
    h_head = dev.head(input_ids, mask)
    up = h_head.detach().requires_grad_(True)
    h_mid = srv.forward(up, mask)
    down = h_mid.detach().requires_grad_(True)
    loss = dev.tail_loss(down, mask, labels)  # the LM head only where a label is predicted
    loss.backward()
    h_mid.backward(down.grad)
    h_head.backward(up.grad)

    assert torch.allclose(loss, ref, atol=1e-6, rtol=1e-5), (float(loss), float(ref))
    with torch.no_grad():  # the full logits' loss is the same
        assert torch.allclose(response_loss(dev.tail(down, mask), labels), ref, atol=1e-6, rtol=1e-5)
    for n, p in {**dparams, **sparams}.items():
        want = full._params[n].grad
        assert p.grad is not None and want is not None, n
        assert torch.allclose(p.grad, want, atol=1e-6, rtol=1e-4), (n, float((p.grad - want).abs().max()))
    assert any(float(p.grad.abs().max()) > 0 for n, p in sparams.items() if ".lora_A." in n)


def test_the_device_part_holds_only_its_blocks(deep_llama):
    adapter = AdapterSpec(r=4, alpha=8)
    _, dev, dparams, _ = load_part(deep_llama, adapter, l_head=1, l_tail=1, side="device")
    _, srv, sparams, _ = load_part(deep_llama, adapter, l_head=1, l_tail=1, side="server")
    assert len(dev.decoder.layers) == 2 and len(srv.decoder.layers) == 3
    assert srv.decoder.embed_tokens is None  # the server holds no embedding or head
    assert {n.split(".layers.")[1].split(".")[0] for n in dparams} == {"0", "4"}
    assert {n.split(".layers.")[1].split(".")[0] for n in sparams} == {"1", "2", "3"}
