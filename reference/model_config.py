"""The reference model's ``DeepseekV4Config``: V4-Flash's layout in miniature, sized to train in minutes.

Layout (DeepSeek-V4 paper, section 2.3): layers 0-1 sliding-window only, then CSA (compress rate m = 4, with a
Lightning Indexer) at even layers 2, 4, ..., 10 and HCA (m' = 128) at odd layers 3, 5, ..., 11. Five CSA layers
make a 3-of-5 vote meaningful; 16 indexer heads avoid the ReLU ties of very small indexers; the sliding window
is Flash's 128 tokens, so anything further back is reachable only through compressed entries.
"""

from __future__ import annotations

# Plain RoPE (no YaRN), so this is only the range the config declares: evaluation goes to 128K tokens plus answers.
MAX_POSITIONS = 262144

CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"
SLIDING = "sliding_attention"


def flash_layout(n_layers: int) -> list[str]:
    """Two sliding layers, then CSA at even and HCA at odd layer indices (Flash: 43 layers)."""
    return [SLIDING] * 2 + [CSA if i % 2 == 0 else HCA for i in range(2, n_layers)]


def reference_config(vocab_size: int = 4096):
    from transformers import DeepseekV4Config

    n_layers = 12
    return DeepseekV4Config(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=192,
        moe_intermediate_size=192,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=128,
        q_lora_rank=128,
        o_groups=2,
        o_lora_rank=64,
        partial_rotary_factor=0.25,
        n_routed_experts=4,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=flash_layout(n_layers),
        compress_rates={CSA: 4, HCA: 128},
        sliding_window=128,
        index_n_heads=16,
        index_head_dim=32,
        index_topk=64,
        hc_mult=2,
        hc_sinkhorn_iters=4,
        max_position_embeddings=MAX_POSITIONS,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
    )


def toy_config(vocab_size: int = 4096):
    """A few-layer version for CPU smoke tests of the training step (same layer kinds, tiny widths)."""
    from transformers import DeepseekV4Config

    n_layers = 4
    return DeepseekV4Config(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=64, moe_intermediate_size=64,
        num_hidden_layers=n_layers, num_attention_heads=2, num_key_value_heads=1, head_dim=32, q_lora_rank=32,
        o_groups=2, o_lora_rank=16, partial_rotary_factor=0.25, n_routed_experts=2, num_local_experts=2,
        num_experts_per_tok=1, layer_types=flash_layout(n_layers), compress_rates={CSA: 4, HCA: 16},
        sliding_window=16, index_n_heads=16, index_head_dim=16, index_topk=4, hc_mult=2, hc_sinkhorn_iters=2,
        max_position_embeddings=MAX_POSITIONS, bos_token_id=0, eos_token_id=1, pad_token_id=2,
        tie_word_embeddings=False,
    )


def csa_layer_indices(config) -> list[int]:
    return [i for i, kind in enumerate(config.layer_types) if kind == CSA]
