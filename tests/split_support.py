"""Helpers of the split-learning tests: a tiny random Llama deep enough to cut in three."""

from __future__ import annotations

from pathlib import Path


def build_deep_tiny_llama(out_dir: Path, layers: int = 4, seed: int = 11) -> str:
    """A tiny random-init Llama of ``layers`` blocks (hidden 64, tied embeddings, byte tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from edge_agent.models import build_tiny_tokenizer

    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        return str(out_dir)
    tok = build_tiny_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
        tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, dtype="float32",
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(str(out_dir))
    tok.save_pretrained(str(out_dir))
    return str(out_dir)
