"""A DeepSeek-V4-Flash miniature in the official release format, and its dequantized twin, for tests.

``write_official_checkpoint(directory)`` writes two folders:

- ``official/``: what ``deepseek-ai/DeepSeek-V4-Flash`` ships, shrunk. DeepSeek's tensor names (``embed.weight``,
  ``layers.{i}.attn.wq_a.weight``, ``layers.{i}.attn.indexer.compressor.wkv.weight``,
  ``layers.{i}.ffn.experts.{e}.w1.weight``, ``mtp.0.*`` ...), two shards and ``model.safetensors.index.json``,
  and the release's storage formats:

  * FP8 linears (attention ``wq_a wq_b wkv wo_a wo_b``, the indexer's ``wq_b``, the shared expert's ``w1 w2 w3``):
    ``float8_e4m3fn`` weight plus ``<name>.scale``, one UE8M0 factor (``float8_e8m0fnu``, a power of two) per
    128 x 128 block, shape ``[ceil(out/128), ceil(in/128)]``; value = e4m3(q) * scale.
  * FP4 routed experts (``expert_dtype: fp4``): e2m1 codes packed two per byte (element 2j in the low nibble,
    2j+1 in the high one), stored as ``int8`` ``[out, in/2]``, plus ``<name>.scale``: UE8M0, one per 32 inputs,
    ``[out, in/32]``; value = e2m1(code) * scale.
  * BF16: embeddings, head, router weight, norms, the compressors' ``wkv``/``wgate``, the indexer's
    ``weights_proj``; FP32: ``hc_*``, ``attn_sink``, ``ape``, the router bias; INT32: the hash router's
    ``tid2eid``.

  ``config.json`` uses the release's keys: ``compress_ratios`` (one per layer plus one for the MTP layer; the
  layer layout comes from it, never from defaults), ``num_hash_layers``, ``rope_scaling`` (YaRN),
  ``expert_dtype: "fp4"`` and ``quantization_config`` ``{quant_method fp8, fmt e4m3, scale_fmt ue8m0,
  weight_block_size [128, 128], activation_scheme dynamic}``.

- ``reference/``: the same model unquantized: every quantized weight replaced by its dequantized value (exact in
  bf16: an e4m3 or e2m1 value times a power of two has at most 4 significant bits), under transformers' own
  parameter names (``model.layers.{i}.self_attn.q_a_proj.weight``, merged ``mlp.experts.gate_up_proj``) and
  without a quantization config, so it loads through the plain path and no renaming.

What is kept from V4-Flash: head_dim 512 (rope 64), q_lora_rank 1024, o_lora_rank 1024, o_groups 8, one KV head,
index_n_heads 64, index_head_dim 128, sliding_window 128, compress rates 4 / 128, hc_mult 4 with 20 Sinkhorn
iterations, 3 hash-routed layers, the YaRN and RoPE constants. Shrunk to fit a 2-core CPU test: hidden 256
(4096), 8 attention heads (64), 5 layers (43; ``compress_ratios`` = the release's first five, ``[0, 0, 4, 128,
4]``, + the MTP entry: sliding, sliding, CSA, HCA, CSA), 8 routed experts (256) with 2 per token (6), expert
width 256 (2048), vocabulary 1024 (129280), index_topk 32 (512: with a few hundred tokens a top-512 would keep
every compressed entry and never exercise the selection). Every FP8 weight's dimensions are multiples of 128, as
in the release. The weights are random (fixed seed) with unit-scale activations; ``attn_sink``, ``ape``, the
router bias and the hc bases are non-zero so that their paths are exercised.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

FP8_BLOCK = 128
FP4_GROUP = 32
E4M3_MAX = 448.0
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)  # codes 0..7; code | 8 is the negative value
# DeepSeek-V4-Flash's compress_ratios as its config.json gives them: 43 layers, then the MTP layer
FLASH_COMPRESS_RATIOS = (0, 0) + (4, 128) * 20 + (4, 0)

QUANTIZATION_CONFIG = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
                       "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}


@dataclass(frozen=True)
class OfficialMiniature:
    """Where ``write_official_checkpoint`` put things, and the official config it wrote."""

    official: Path
    reference: Path
    config: dict


def miniature_config(num_hidden_layers: int = 5, hidden_size: int = 256, num_attention_heads: int = 8,
                     n_routed_experts: int = 8, vocab_size: int = 1024, index_topk: int = 32) -> dict:
    """The official ``config.json`` of the miniature (V4-Flash's keys and constants, shrunk where said above)."""
    if num_hidden_layers > len(FLASH_COMPRESS_RATIOS) - 1:
        raise ValueError(f"V4-Flash has {len(FLASH_COMPRESS_RATIOS) - 1} layers")
    return {
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "vocab_size": vocab_size,
        "hidden_size": hidden_size,
        "moe_intermediate_size": 256,
        "num_hidden_layers": num_hidden_layers,
        "num_attention_heads": num_attention_heads,
        "num_key_value_heads": 1,
        "head_dim": 512,
        "qk_rope_head_dim": 64,
        "q_lora_rank": 1024,
        "o_lora_rank": 1024,
        "o_groups": 8,
        "n_routed_experts": n_routed_experts,
        "n_shared_experts": 1,
        "num_experts_per_tok": 2,
        "num_hash_layers": 3,
        "scoring_func": "sqrtsoftplus",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "routed_scaling_factor": 1.5,
        "swiglu_limit": 10.0,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 1048576,
        "rope_theta": 10000.0,
        "compress_rope_theta": 160000.0,
        "rope_scaling": {"type": "yarn", "factor": 16, "original_max_position_embeddings": 65536,
                         "beta_fast": 32, "beta_slow": 1},
        "compress_ratios": list(FLASH_COMPRESS_RATIOS[:num_hidden_layers]) + [FLASH_COMPRESS_RATIOS[-1]],
        "sliding_window": 128,
        "index_n_heads": 64,
        "index_head_dim": 128,
        "index_topk": index_topk,
        "hc_mult": 4,
        "hc_sinkhorn_iters": 20,
        "hc_eps": 1e-6,
        "num_nextn_predict_layers": 1,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "expert_dtype": "fp4",
        "quantization_config": dict(QUANTIZATION_CONFIG),
    }


# ---- the two block formats ----------------------------------------------------------------------------------

def _ue8m0_exponent(amax: torch.Tensor, top: float) -> torch.Tensor:
    """k = ceil(log2(amax / top)): the smallest power-of-two scale 2^k that maps amax into [-top, top]."""
    return torch.ceil(torch.log2(amax.clamp(min=1e-30) / top)).to(torch.int32).clamp(-127, 127)


def quantize_fp8_block(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[out, in] float -> (e4m3 weight, UE8M0 scale [out/128, in/128], dequantized fp32 value)."""
    out_f, in_f = w.shape
    blocks = w.float().reshape(out_f // FP8_BLOCK, FP8_BLOCK, in_f // FP8_BLOCK, FP8_BLOCK)
    k = _ue8m0_exponent(blocks.abs().amax(dim=(1, 3)), E4M3_MAX)  # [out/128, in/128]
    scale = torch.exp2(k.float())[:, None, :, None]
    q = (blocks / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    value = (q.float() * scale).reshape(out_f, in_f)
    return q.reshape(out_f, in_f), (k + 127).to(torch.uint8).view(torch.float8_e8m0fnu), value


def quantize_fp4_group(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[out, in] float -> (packed e2m1 int8 [out, in/2], UE8M0 scale [out, in/32], dequantized fp32 value)."""
    out_f, in_f = w.shape
    groups = w.float().reshape(out_f, in_f // FP4_GROUP, FP4_GROUP)
    k = _ue8m0_exponent(groups.abs().amax(dim=2), 6.0)  # [out, in/32]
    scaled = groups / torch.exp2(k.float())[:, :, None]
    magnitudes = torch.tensor(E2M1_MAGNITUDES)
    index = (scaled.abs()[..., None] - magnitudes).abs().argmin(dim=-1)  # nearest e2m1 magnitude
    code = (index | ((scaled < 0).long() << 3)).reshape(out_f, in_f).to(torch.uint8)
    packed = (code[:, 0::2] | (code[:, 1::2] << 4)).view(torch.int8)
    value = (torch.where(scaled < 0, -magnitudes[index], magnitudes[index])
             * torch.exp2(k.float())[:, :, None]).reshape(out_f, in_f)
    return packed, (k + 127).to(torch.uint8).view(torch.float8_e8m0fnu), value


# ---- the miniature ------------------------------------------------------------------------------------------

class _Writer:
    """Collects official tensors and their transformers-named reference values."""

    def __init__(self, seed: int):
        self.gen = torch.Generator().manual_seed(seed)
        self.official: dict[str, torch.Tensor] = {}
        self.reference: dict[str, torch.Tensor] = {}

    def randn(self, *shape, std: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen) * std

    def plain(self, name: str, hf_name: str | None, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        stored = value.to(dtype)
        self.official[name] = stored
        if hf_name is not None:
            self.reference[hf_name] = stored.clone() if dtype != torch.int32 else stored.long()
        return stored

    def linear(self, name: str, hf_name: str | None, out_f: int, in_f: int, fmt: str) -> torch.Tensor:
        """A projection weight [out, in] in ``fmt`` ("fp8", "fp4" or "bf16"); returns its (dequantized) value."""
        w = self.randn(out_f, in_f, std=in_f ** -0.5)
        if fmt == "bf16":
            return self.plain(f"{name}.weight", hf_name, w, torch.bfloat16).float()
        quantize = quantize_fp8_block if fmt == "fp8" else quantize_fp4_group
        q, scale, value = quantize(w)
        self.official[f"{name}.weight"], self.official[f"{name}.scale"] = q, scale
        if hf_name is not None:
            self.reference[hf_name] = value.to(torch.bfloat16)
        return value

    def norm(self, name: str, hf_name: str | None, dim: int) -> None:
        self.plain(name, hf_name, 1.0 + self.randn(dim, std=0.1), torch.bfloat16)


def _layer(w: _Writer, cfg: dict, i: int, ratio: int) -> None:
    d, heads, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_dim"]
    q_rank, o_rank, groups = cfg["q_lora_rank"], cfg["o_lora_rank"], cfg["o_groups"]
    o, h = f"layers.{i}.", f"model.layers.{i}."
    mix = (2 + cfg["hc_mult"]) * cfg["hc_mult"]
    for part, hf in (("attn", "attn_hc"), ("ffn", "ffn_hc")):
        w.plain(f"{o}hc_{part}_fn", f"{h}{hf}.fn", w.randn(mix, cfg["hc_mult"] * d, std=d ** -0.5), torch.float32)
        w.plain(f"{o}hc_{part}_base", f"{h}{hf}.base", w.randn(mix, std=0.1), torch.float32)
        w.plain(f"{o}hc_{part}_scale", f"{h}{hf}.scale", 1.0 + w.randn(3, std=0.1), torch.float32)
    w.norm(f"{o}attn_norm.weight", f"{h}input_layernorm.weight", d)
    w.norm(f"{o}ffn_norm.weight", f"{h}post_attention_layernorm.weight", d)

    a, ha = f"{o}attn.", f"{h}self_attn."
    w.plain(f"{a}attn_sink", f"{ha}sinks", w.randn(heads, std=0.5), torch.float32)
    w.linear(f"{a}wq_a", f"{ha}q_a_proj.weight", q_rank, d, "fp8")
    w.norm(f"{a}q_norm.weight", f"{ha}q_a_norm.weight", q_rank)
    w.linear(f"{a}wq_b", f"{ha}q_b_proj.weight", heads * hd, q_rank, "fp8")
    w.linear(f"{a}wkv", f"{ha}kv_proj.weight", hd, d, "fp8")
    w.norm(f"{a}kv_norm.weight", f"{ha}kv_norm.weight", hd)
    w.linear(f"{a}wo_a", f"{ha}o_a_proj.weight", groups * o_rank, heads * hd // groups, "fp8")
    w.linear(f"{a}wo_b", f"{ha}o_b_proj.weight", d, groups * o_rank, "fp8")
    if ratio:
        coff = 2 if ratio == 4 else 1  # CSA windows overlap: two series per token
        _compressor(w, f"{a}compressor.", f"{ha}compressor.", ratio, coff * hd, hd, d)
    if ratio == 4:
        ih, idim = cfg["index_n_heads"], cfg["index_head_dim"]
        w.linear(f"{a}indexer.wq_b", f"{ha}compressor.indexer.q_b_proj.weight", ih * idim, q_rank, "fp8")
        w.linear(f"{a}indexer.weights_proj", f"{ha}compressor.indexer.scorer.weights_proj.weight", ih, d, "bf16")
        _compressor(w, f"{a}indexer.compressor.", f"{ha}compressor.indexer.", ratio, 2 * idim, idim, d)

    f, hf = f"{o}ffn.", f"{h}mlp."
    experts, inter = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    w.plain(f"{f}gate.weight", f"{hf}gate.weight", w.randn(experts, d, std=d ** -0.5), torch.bfloat16)
    if i < cfg["num_hash_layers"]:
        tid2eid = torch.stack([torch.randperm(experts, generator=w.gen)[: cfg["num_experts_per_tok"]]
                               for _ in range(cfg["vocab_size"])])
        w.plain(f"{f}gate.tid2eid", f"{hf}gate.tid2eid", tid2eid, torch.int32)
    else:
        w.plain(f"{f}gate.bias", f"{hf}gate.e_score_correction_bias", w.randn(experts, std=0.1), torch.float32)
    gate_up, down = [], []
    for e in range(experts):
        w1 = w.linear(f"{f}experts.{e}.w1", None, inter, d, "fp4")
        w2 = w.linear(f"{f}experts.{e}.w2", None, d, inter, "fp4")
        w3 = w.linear(f"{f}experts.{e}.w3", None, inter, d, "fp4")
        gate_up.append(torch.cat([w1, w3]))  # transformers' gate_up_proj: gate rows, then up rows
        down.append(w2)
    w.reference[f"{hf}experts.gate_up_proj"] = torch.stack(gate_up).to(torch.bfloat16)
    w.reference[f"{hf}experts.down_proj"] = torch.stack(down).to(torch.bfloat16)
    for proj, hf_proj, (out_f, in_f) in (("w1", "gate_proj", (inter, d)), ("w2", "down_proj", (d, inter)),
                                         ("w3", "up_proj", (inter, d))):
        w.linear(f"{f}shared_experts.{proj}", f"{hf}shared_experts.{hf_proj}.weight", out_f, in_f, "fp8")


def _compressor(w: _Writer, o: str, h: str, ratio: int, width: int, head_dim: int, d: int) -> None:
    w.plain(f"{o}ape", f"{h}position_bias", w.randn(ratio, width, std=0.5), torch.float32)
    w.linear(f"{o}wkv", f"{h}kv_proj.weight", width, d, "bf16")
    w.linear(f"{o}wgate", f"{h}gate_proj.weight", width, d, "bf16")
    w.norm(f"{o}norm.weight", f"{h}kv_norm.weight", head_dim)


def _mtp(w: _Writer, cfg: dict) -> None:
    """A few of the release's multi-token-prediction tensors: transformers does not build that layer and must skip
    them (``_keys_to_ignore_on_load_unexpected``)."""
    d = cfg["hidden_size"]
    for proj in ("e_proj", "h_proj"):
        w.linear(f"mtp.0.{proj}", None, d, d, "fp8")
    for norm in ("enorm", "hnorm", "norm"):
        w.norm(f"mtp.0.{norm}.weight", None, d)


def write_official_checkpoint(directory: str | Path, seed: int = 0, **shape) -> OfficialMiniature:
    """Write ``official/`` and ``reference/`` (see the module docstring) under ``directory``; ``shape`` overrides
    :func:`miniature_config`'s arguments."""
    directory = Path(directory)
    cfg = miniature_config(**shape)
    w = _Writer(seed)
    d, vocab = cfg["hidden_size"], cfg["vocab_size"]
    w.plain("embed.weight", "model.embed_tokens.weight", w.randn(vocab, d), torch.bfloat16)
    for i in range(cfg["num_hidden_layers"]):
        _layer(w, cfg, i, cfg["compress_ratios"][i])
    w.norm("norm.weight", "model.norm.weight", d)
    hc = cfg["hc_mult"]
    w.plain("hc_head_fn", "model.hc_head.hc_fn", w.randn(hc, hc * d, std=d ** -0.5), torch.float32)
    w.plain("hc_head_base", "model.hc_head.hc_base", w.randn(hc, std=0.1), torch.float32)
    w.plain("hc_head_scale", "model.hc_head.hc_scale", 1.0 + w.randn(1, std=0.1), torch.float32)
    w.plain("head.weight", "lm_head.weight", w.randn(vocab, d, std=d ** -0.5), torch.bfloat16)
    _mtp(w, cfg)

    official = directory / "official"
    official.mkdir(parents=True, exist_ok=True)
    names = list(w.official)
    half = math.ceil(len(names) / 2)
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    weight_map, total = {}, 0
    for shard, keys in shards.items():
        save_file({k: w.official[k].contiguous() for k in keys}, official / shard, metadata={"format": "pt"})
        weight_map.update({k: shard for k in keys})
        total += sum(w.official[k].numel() * w.official[k].element_size() for k in keys)
    (official / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    (official / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")

    reference = directory / "reference"
    reference.mkdir(parents=True, exist_ok=True)
    plain_cfg = {k: v for k, v in cfg.items() if k not in ("quantization_config", "expert_dtype")}
    (reference / "config.json").write_text(json.dumps(plain_cfg, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in w.reference.items()}, reference / "model.safetensors",
              metadata={"format": "pt"})
    return OfficialMiniature(official=official, reference=reference, config=cfg)
