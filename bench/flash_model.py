"""A DeepSeek-V4-Flash-shaped backbone for benchmarks: real attention/KV dimensions, shrunk MoE, random bf16.

Attention and KV layout are V4-Flash's (transformers' defaults): hidden 4096, 43 layers with layers 0-1
sliding, CSA at 2, 4, ..., 42 (21 layers) and HCA at 3, 5, ..., 41; 64 heads x head_dim 512 (one shared KV
head), q_lora 1024, indexer 64 x 128, top-k 512, window 128, CSA rate 4, HCA rate 128. The MoE is shrunk to
a few small experts: experts never touch the KV path this project measures.
"""

from __future__ import annotations

import torch

FLASH_LAYER_TYPES = ["sliding_attention"] * 2 + [
    "compressed_sparse_attention" if i % 2 == 0 else "heavily_compressed_attention" for i in range(2, 43)
]


def flash_config(n_experts: int = 4, expert_dim: int = 256, vocab_size: int = 32_000):
    from transformers import DeepseekV4Config

    return DeepseekV4Config(
        num_hidden_layers=43,
        layer_types=FLASH_LAYER_TYPES,
        n_routed_experts=n_experts,
        num_local_experts=n_experts,
        num_experts_per_tok=2,
        moe_intermediate_size=expert_dim,
        intermediate_size=expert_dim,
        vocab_size=vocab_size,
    )


def build_flash_model(device: str = "cuda", dtype=torch.bfloat16, seed: int = 0):
    """Random-weight DeepseekV4ForCausalLM with Flash attention dimensions, built directly on ``device``."""
    from transformers import DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    config = flash_config()
    with torch.device(device):
        model = DeepseekV4ForCausalLM(config)
    return model.to(dtype).eval()
