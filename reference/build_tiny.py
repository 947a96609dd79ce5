"""Build the bundled ``tiny`` DeepSeek-V4: random weights (seed 0), a small byte-level BPE tokenizer, a sample corpus.

Run ``python -m reference.build_tiny`` to re-create ``data/tiny/`` and ``data/sample/corpus.jsonl`` byte for byte.
The model keeps V4-Flash's layout in miniature: two sliding layers, then CSA/HCA alternating (CSA at
2, 4, ..., 10: five CSA layers so a 3-of-5 vote means something), 16 indexer heads, a few MoE experts.
``position_bias``, ``sinks`` and the hash-routing table are perturbed so those paths are exercised, and the
indexer's head weights are scaled up so its scores are peaked (as a trained indexer's are) rather than flat.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
DATA_DIR = HERE.parent / "data"
TINY_DIR = DATA_DIR / "tiny"
SAMPLE = DATA_DIR / "sample" / "corpus.jsonl"

# Standard-library modules used for the sample corpus (present in every CPython install).
SAMPLE_MODULES = ["argparse.py", "textwrap.py", "difflib.py", "heapq.py", "fractions.py", "shlex.py",
                  "bisect.py", "calendar.py", "statistics.py", "string.py", "queue.py", "sched.py"]


def tiny_config():
    from transformers import DeepseekV4Config

    n_layers = 12
    layer_types = ["sliding_attention"] * 2 + [
        "compressed_sparse_attention" if i % 2 == 0 else "heavily_compressed_attention" for i in range(2, n_layers)
    ]
    return DeepseekV4Config(
        vocab_size=1024,
        hidden_size=128,
        intermediate_size=128,
        moe_intermediate_size=128,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=64,
        q_lora_rank=64,
        o_groups=2,
        o_lora_rank=32,
        partial_rotary_factor=0.25,
        n_routed_experts=4,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=layer_types,
        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 32},
        sliding_window=32,
        index_n_heads=16,
        index_head_dim=32,
        index_topk=16,
        hc_mult=2,
        hc_sinkhorn_iters=4,
        max_position_embeddings=65536,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
        tie_word_embeddings=False,
    )


def build_tokenizer(texts):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<bos>", "<eos>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def stdlib_texts():
    lib = Path(sysconfig.get_paths()["stdlib"])
    return [(name, (lib / name).read_text(encoding="utf-8")) for name in SAMPLE_MODULES]


def main():
    from transformers import DeepseekV4ForCausalLM

    texts = stdlib_texts()
    tokenizer = build_tokenizer([t for _, t in texts])
    torch.manual_seed(0)
    config = tiny_config()
    model = DeepseekV4ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("position_bias"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.5)
            elif name.endswith("sinks"):
                param.copy_(torch.randn(param.shape, generator=gen))
            # Sharpen the random Lightning Indexers so their softmax is peaked like a trained one's
            # (nucleus ~15% of visible entries instead of ~40%): near-uniform logits make every label a tie.
            elif name.endswith("scorer.weights_proj.weight"):
                param.mul_(36.0)
            elif name.endswith("indexer.q_b_proj.weight"):
                param.mul_(2.0)
        for name, buf in model.named_buffers():
            if name.endswith("tid2eid"):
                buf.copy_(torch.randint(0, config.num_local_experts, buf.shape, generator=gen))
    TINY_DIR.mkdir(parents=True, exist_ok=True)
    # bf16 on disk halves the repo; bf16 values load exactly into float32 for CPU tests.
    model.to(torch.bfloat16).save_pretrained(TINY_DIR)
    tokenizer.save_pretrained(TINY_DIR)
    (TINY_DIR / "fm_index.json").write_text(json.dumps({"name": "tiny", "trained": False,
                                                        "note": "random weights, seed 0"}, indent=2) + "\n")
    SAMPLE.parent.mkdir(parents=True, exist_ok=True)
    with SAMPLE.open("w") as f:
        for name, text in texts:
            f.write(json.dumps({"id": f"stdlib/{name}", "text": text[:12000]}) + "\n")


if __name__ == "__main__":
    main()
