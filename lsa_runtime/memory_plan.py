"""Memory plan of DeepSeek-V4 decoding, full vs Lookahead Sparse Attention, from the config alone (no weight read).

Three questions, each a pure function of a ``DeepseekV4Config`` and a few stated assumptions:

1. :func:`count_weights` -- how many bytes the weights take, tensor by tensor, as transformers holds them: the
   parameters of ``DeepseekV4ForCausalLM`` (embedding, lm head, per layer the attention with its CSA compressor and
   Lightning Indexer or its HCA compressor, the mHC mixers, the MoE router, routed and shared experts, the norms)
   and its persistent buffers (hash-routing tables, router biases). The multi-token-prediction layer of the
   checkpoints (``mtp.*``) is not built by transformers and not counted. Storage follows transformers' loading:
   the config's dtype (bf16) for what stays unquantized, fp32 for ``_keep_in_fp32_modules_strict`` (norm weights,
   mHC, sinks, ``position_bias``); with an FP8 ``quantization_config`` every ``nn.Linear`` outside the skip list
   is FP8 e4m3 (1 byte) with one scale per 128 x 128 block (UE8M0: 1 byte; ``scale_fmt`` "float": 4), the grouped
   output projection too; routed experts are FP8 the same way or, with ``expert_dtype`` "fp4", two e2m1 weights
   per byte with one UE8M0 scale per 32 weights of a row. The skip list, as transformers builds it: the lm head
   (the output embedding), the CSA/HCA compressors' ``kv_proj`` / ``gate_proj`` and the indexer's ``kv_proj`` /
   ``gate_proj`` / ``weights_proj`` (``_keep_in_fp32_modules``: they ship in bf16), and the config's own
   ``modules_to_not_convert``; embeddings and routers are not ``nn.Linear`` and stay bf16.
   Published V4-Flash (:func:`flash_config`): 284,332,230,231 parameters; 155,997,933,020 bytes of parameters
   (FP8 linears + FP4 experts) + 18,657,280 bytes of buffers = 156.0 GB (tests check both against transformers'
   own model built on the meta device).

2. :func:`sequence_state` -- the bytes one sequence holds at a context of L tokens, by kind, as THIS runtime stores
   them (``stats.measure_cache`` kinds; DESIGN.md, "Accounting"), with m = CSA rate, m' = HCA rate, W = sliding
   window, E = L // m compressed entries per CSA layer:

   * ``window``: every layer's sliding-window K = V, W rows (the 127 kept + the step's token) of ``head_dim``;
     the stock ``DynamicSlidingWindowLayer`` of sliding layers keeps K and V as two tensors, CSA/HCA layers one;
   * ``pending``: open compression windows (tokens since the last emitted entry, their KV and gate projections, 2
     series wide in CSA) and the CSA overlap state (the last window's Ca series, its gate in fp32 because
     ``position_bias`` is fp32);
   * ``hca``: L // m' entries C^Comp of ``head_dim`` per HCA layer (DeepSeek-V4 paper, section 2.3.2);
   * ``csa_kv``: C^Comp (``head_dim``) per CSA entry -- full: all E entries of every CSA layer; LSA: the resident
     set only, selected + room for tau/m + 2 entries born before the next trigger (``ResidentSet``);
   * ``csa_index_keys``: K^IComp (``index_head_dim``), the Lightning Indexer's keys (section 2.3.1, eq. 13) --
     full: all entries; LSA: the resident rows;
   * ``memory_index_keys``: LSA with ``memory_keys="device"``: K^IComp of all E entries at the memory-indexer
     layers (FlashMemory scores every entry at a trigger); amortised growth may add up to a quarter more
     (``growth_slack``).

   The LSA resident set: the recency tail (``keep_recent`` newest entries, the release's 2,048 = 4 x top-k) plus
   ``resident_fraction`` of the older entries (default 0.135: the paper's "13.5%" CSA-KV ratio). Host: the cold pool
   holds C^Comp and K^IComp of every entry of every CSA layer (``ColdPool``), pinned; a Session allocates it once
   for the prompt and ``max_new_tokens`` (``host_pool_allocated_bytes``: one row more than the entries of L tokens). ``transient_bytes``:
   what one sequence briefly adds while it prefills in LSA mode (every CSA layer's K^IComp of all entries, which the
   exact native top-k needs). States are in the model's dtype (``kv_dtype``, bf16 by default); tests compare every
   kind with ``Session.stats.device_bytes`` of tiny and Flash-shaped models.

3. :func:`concurrency` -- how many sequences at context L fit: the weights are split evenly over the GPUs (expert
   parallel / ``device_map``: an assumption), each GPU keeps a reserve for activations, the CUDA context and
   workspace, and the rest holds KV state: summed over the GPUs when each GPU keeps its own layers' KV
   (``kv_placement="split"``, transformers' ``device_map``), or on every GPU in full when tensor parallelism
   replicates the single KV head (``"replicated"``, the authors' SGLang TP8). LSA is also capped by the host
   memory its pinned pools may take. The result names the limiting factor.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import asdict, dataclass, field, replace

from .backbone import CSA, HCA, SLIDING
from .errors import FmIndexError
from .stats import KIND_LABELS, KINDS

KV_DTYPES = {"bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2, "float32": 4, "fp32": 4}
MODES = ("full", "lsa")
PLACEMENTS = ("split", "replicated")
FLASH_NAME = "deepseek-v4-flash"
# The published V4-Flash checkpoint's storage (its config.json): FP8 e4m3 linears, UE8M0 scales per 128 x 128
# block, FP4 routed experts.
FLASH_QUANTIZATION = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "scale_fmt": "ue8m0",
                      "weight_block_size": [128, 128]}
FLASH_COMPRESS_RATIOS = [0, 0] + [4, 128] * 20 + [4]  # layers 0-1 sliding; CSA 2, 4, ..., 42; HCA 3, 5, ..., 41
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}
FP8_SKIP = ("lm_head", "self_attn.compressor.kv_proj", "self_attn.compressor.gate_proj",
            "self_attn.compressor.indexer.kv_proj", "self_attn.compressor.indexer.gate_proj",
            "self_attn.compressor.indexer.scorer.weights_proj")  # never FP8 (transformers' skip list for DS-V4)
FP4_GROUP = 32  # FP4 experts: one UE8M0 scale per 32 weights of a row
GROWTH_SLACK = 0.25  # device GrowingRows grow by a quarter (at least 64 rows)


class PlanError(FmIndexError):
    """A memory-plan input the user can fix: a model that is not DeepSeek-V4, a size, a context, too little memory."""


# ---- weights ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightGroup:
    """One group of tensors: ``parameters`` (elements, counted as ``sum(p.numel())``) and ``bytes`` as stored
    (quantized weights with their block scales)."""

    name: str
    parameters: int
    bytes: int


@dataclass(frozen=True)
class WeightPlan:
    """The weights' footprint by group; ``buffers`` = persistent buffers (hash-routing tables, router biases), held
    on the device beside the parameters. ``storage`` says how linear and expert weights are stored."""

    groups: tuple[WeightGroup, ...]
    buffer_bytes: int
    storage: str

    @property
    def parameters(self) -> int:
        return sum(group.parameters for group in self.groups)

    @property
    def parameter_bytes(self) -> int:
        return sum(group.bytes for group in self.groups)

    @property
    def bytes(self) -> int:
        """Everything the device holds for the model: parameters (with scales) and buffers."""
        return self.parameter_bytes + self.buffer_bytes

    def as_dict(self) -> dict:
        return {"groups": [asdict(g) for g in self.groups], "parameters": self.parameters,
                "parameter_bytes": self.parameter_bytes, "buffer_bytes": self.buffer_bytes, "bytes": self.bytes,
                "storage": self.storage}


@dataclass(frozen=True)
class _Storage:
    """How the checkpoint stores each kind of tensor (from ``config.dtype`` and ``config.quantization_config``)."""

    dense_bytes: int  # unquantized tensors in the config's dtype
    fp8: bool  # FP8 linears
    block: tuple[int, int]
    scale_bytes: int  # per block scale: UE8M0 1, float 4
    experts: str  # "dense", "fp8" or "fp4"
    static_activations: bool
    skip: tuple[str, ...]

    @classmethod
    def of(cls, config) -> "_Storage":
        dtype = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "bfloat16")
        dtype = dtype.removeprefix("torch.")
        dense = DTYPE_BYTES.get(dtype, 2)
        quant = getattr(config, "quantization_config", None)
        if quant is not None and not isinstance(quant, dict):
            quant = quant.to_dict()
        if not quant or quant.get("dequantize"):
            return cls(dense, False, (128, 128), 0, "dense", False, ())
        method = str(quant.get("quant_method", ""))
        if method != "fp8":
            raise PlanError(f"the config's quantization '{method}' is not modelled (fm-index plans bf16/fp16/fp32 "
                            "weights or DeepSeek's FP8 block quantization)")
        block = tuple(int(x) for x in (quant.get("weight_block_size") or (128, 128)))
        if len(block) != 2 or min(block) < 1:
            raise PlanError(f"quantization_config.weight_block_size must be two positive sizes, got {block}")
        scale_bytes = 1 if quant.get("scale_fmt") == "ue8m0" else 4
        experts = quant.get("expert_dtype") or getattr(config, "expert_dtype", None) or "fp8"
        if experts not in ("fp8", "fp4"):
            raise PlanError(f"quantization_config.expert_dtype must be fp8 or fp4, got {experts!r}")
        skip = FP8_SKIP + tuple(quant.get("modules_to_not_convert") or ())
        return cls(dense, True, block, scale_bytes, experts, quant.get("activation_scheme") == "static", skip)

    def skipped(self, module: str) -> bool:
        """Whether ``module`` stays unquantized (transformers' matching: from the start at a module boundary, as a
        regular expression, or as a suffix)."""
        return any(re.match(rf"(?:{p})(?:(?<=\.)|(?=\.|$))", module) or module.endswith(p) for p in self.skip)

    def linear(self, module: str, out_features: int, in_features: int) -> int:
        """Bytes of an ``nn.Linear`` weight [out, in] (also the grouped output projection, [g*d_g, in/g])."""
        if not self.fp8 or self.skipped(module):
            return out_features * in_features * self.dense_bytes
        b0, b1 = self.block
        scales = math.ceil(out_features / b0) * math.ceil(in_features / b1) * self.scale_bytes
        return out_features * in_features + scales + (4 if self.static_activations else 0)

    def experts_projection(self, n_experts: int, out_features: int, in_features: int, min_scale_rows: int) -> int:
        """Bytes of one stacked expert projection [E, out, in] (gate_up: min_scale_rows 2, as transformers
        allocates its scales)."""
        weights = n_experts * out_features * in_features
        if not self.fp8:
            return weights * self.dense_bytes
        activation_scales = n_experts * 4 if self.static_activations else 0  # one fp32 input scale per expert
        if self.experts == "fp4":
            rows = max(out_features, min_scale_rows)
            scales = n_experts * rows * math.ceil(in_features / FP4_GROUP) * self.scale_bytes
            return weights // 2 + scales + activation_scales
        b0, b1 = self.block
        rows = max(math.ceil(out_features / b0), min_scale_rows)
        return weights + n_experts * rows * math.ceil(in_features / b1) * self.scale_bytes + activation_scales

    def describe(self) -> str:
        dense = {2: "bf16", 4: "fp32"}.get(self.dense_bytes, f"{self.dense_bytes}-byte")
        if not self.fp8:
            return f"{dense} weights (norms, mHC, sinks in fp32)"
        scale = "UE8M0" if self.scale_bytes == 1 else "fp32"
        experts = (f"routed experts FP4 e2m1 + a {scale} scale per {FP4_GROUP} weights" if self.experts == "fp4"
                   else "routed experts FP8 like the linears")
        return (f"linears FP8 e4m3 + a {scale} scale per {self.block[0]}x{self.block[1]} block; {experts}; "
                f"embedding, lm head, compressor/indexer projections, routers {dense}; norms, mHC, sinks fp32")


def count_weights(config) -> WeightPlan:
    """The weights of ``DeepseekV4ForCausalLM(config)`` by group: parameter counts (= ``sum(p.numel())`` of the
    transformers model) and bytes as the checkpoint stores them (see the module docstring). No weight is read."""
    store = _Storage.of(config)
    d, vocab, q_rank = config.hidden_size, config.vocab_size, config.q_lora_rank
    heads, hd = config.num_attention_heads, config.head_dim
    ihd, iheads = config.index_head_dim, config.index_n_heads
    groups_o, o_rank = config.o_groups, config.o_lora_rank
    n_experts, inter = config.n_routed_experts, config.moe_intermediate_size
    hc = config.hc_mult
    dense, fp32 = store.dense_bytes, 4
    totals: dict[str, list[int]] = {}

    def add(group: str, parameters: int, nbytes: int) -> None:
        entry = totals.setdefault(group, [0, 0])
        entry[0] += parameters
        entry[1] += nbytes

    def linear(group: str, module: str, out_features: int, in_features: int) -> None:
        add(group, out_features * in_features, store.linear(module, out_features, in_features))

    def kept_fp32(group: str, n: int) -> None:
        add(group, n, n * fp32)

    add("embedding", vocab * d, vocab * d * dense)
    if not getattr(config, "tie_word_embeddings", False):
        add("lm head", vocab * d, vocab * d * dense)  # the output embedding: never quantized
    kept_fp32("norms", d)  # the final norm
    kept_fp32("mHC", hc * hc * d + hc + 1)  # hc_head: hc_fn [hc, hc*d], hc_base [hc], hc_scale [1]
    mix = (2 + hc) * hc  # an mHC mixer's outputs: pre (hc), post (hc), comb (hc*hc)
    buffers = 0
    for i, layer_type in enumerate(config.layer_types):
        attn = f"model.layers.{i}.self_attn"
        linear("attention", f"{attn}.q_a_proj", q_rank, d)
        linear("attention", f"{attn}.q_b_proj", heads * hd, q_rank)
        linear("attention", f"{attn}.kv_proj", hd, d)
        linear("attention", f"{attn}.o_a_proj", groups_o * o_rank, heads * hd // groups_o)
        linear("attention", f"{attn}.o_b_proj", d, groups_o * o_rank)
        kept_fp32("attention", q_rank + hd + heads)  # q_a_norm, kv_norm, sinks
        if layer_type == CSA:
            rate, comp = config.compress_rates[CSA], f"{attn}.compressor"
            group = "CSA compressor + indexer"
            linear(group, f"{comp}.kv_proj", 2 * hd, d)  # two overlapping series Ca, Cb
            linear(group, f"{comp}.gate_proj", 2 * hd, d)
            kept_fp32(group, rate * 2 * hd + hd)  # position_bias, kv_norm
            linear(group, f"{comp}.indexer.kv_proj", 2 * ihd, d)
            linear(group, f"{comp}.indexer.gate_proj", 2 * ihd, d)
            kept_fp32(group, rate * 2 * ihd + ihd)
            linear(group, f"{comp}.indexer.q_b_proj", iheads * ihd, q_rank)
            linear(group, f"{comp}.indexer.scorer.weights_proj", iheads, d)
        elif layer_type == HCA:
            rate, comp = config.compress_rates[HCA], f"{attn}.compressor"
            linear("HCA compressor", f"{comp}.kv_proj", hd, d)
            linear("HCA compressor", f"{comp}.gate_proj", hd, d)
            kept_fp32("HCA compressor", rate * hd + hd)
        kept_fp32("mHC", 2 * (mix * hc * d + mix + 3))  # attn_hc, ffn_hc: fn, base, scale
        kept_fp32("norms", 2 * d)  # input_layernorm, post_attention_layernorm
        add("router", n_experts * d, n_experts * d * dense)  # a Parameter, not an nn.Linear: never FP8
        if config.mlp_layer_types[i] == "hash_moe":
            buffers += vocab * config.num_experts_per_tok * 8  # tid2eid, int64
        else:
            buffers += n_experts * 4  # e_score_correction_bias, fp32
        add("routed experts", n_experts * 2 * inter * d, store.experts_projection(n_experts, 2 * inter, d, 2))
        add("routed experts", n_experts * d * inter, store.experts_projection(n_experts, d, inter, 1))
        mlp = f"model.layers.{i}.mlp.shared_experts"
        linear("shared expert", f"{mlp}.gate_proj", inter, d)
        linear("shared expert", f"{mlp}.up_proj", inter, d)
        linear("shared expert", f"{mlp}.down_proj", d, inter)
    order = ("embedding", "lm head", "attention", "CSA compressor + indexer", "HCA compressor", "mHC", "norms",
             "router", "routed experts", "shared expert")
    groups = tuple(WeightGroup(name, *totals[name]) for name in order if name in totals)
    return WeightPlan(groups, buffers, store.describe())


# ---- KV state of one sequence ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class LSASettings:
    """The LSA resident set and where its keys live (the Session's options, the release's defaults).

    ``resident_fraction``: share of the entries older than the recency tail that the memory indexer keeps resident
    (the paper's 13.5% CSA-KV ratio by default); ``keep_recent``: the recency tail in entries (None: 4 x the
    backbone's index top-k, the release's 2,048 on V4-Flash); ``memory_layers``: how many memory-indexer layers
    (None: the method's three); ``memory_keys``: ``device`` (their K^IComp of every entry resident) or ``pool``
    (streamed from the cold pool at each trigger); ``tau``: decode steps between triggers (room for tau/m + 2
    newborn entries is kept in the resident rows).
    """

    resident_fraction: float = 0.135
    keep_recent: int | None = None
    memory_layers: int | None = None
    memory_keys: str = "device"
    tau: int = 64
    pool_storage: str = "model"  # the cold pool's host rows: the KV dtype, or fp8 (e4m3 + an fp32 scale per 64)

    def __post_init__(self):
        fraction = self.resident_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 <= fraction <= 1.0:
            raise PlanError(f"--resident-fraction must be in [0, 1], got {fraction}")
        for name in ("keep_recent", "memory_layers"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise PlanError(f"--{name.replace('_', '-')} must be an integer >= 0, got {value}")
        if self.pool_storage not in ("model", "fp8"):
            raise PlanError(f"--pool-storage must be model or fp8, got {self.pool_storage!r}")
        if self.memory_keys not in ("device", "pool"):
            raise PlanError(f"--memory-keys must be device or pool, got {self.memory_keys!r}")
        if isinstance(self.tau, bool) or not isinstance(self.tau, int) or self.tau < 1:
            raise PlanError(f"--tau must be an integer >= 1, got {self.tau}")

    def resolved(self, config) -> "LSASettings":
        """With the backbone's defaults filled in (tail 4 x index top-k; the method's memory layers)."""
        layers = self.memory_layers
        if layers is None:
            from .backbone import default_memory_layers

            layers = len(default_memory_layers(config))
        n_csa = sum(t == CSA for t in config.layer_types)
        if layers > n_csa:
            raise PlanError(f"--memory-layers {layers}: the model has {n_csa} CSA layers")
        return replace(self, keep_recent=4 * config.index_topk if self.keep_recent is None else self.keep_recent,
                       memory_layers=layers)

    def selected(self, entries: int) -> int:
        """Entries a trigger selects out of ``entries`` visible: the tail + the fraction of the older ones."""
        tail = min(entries, self.keep_recent)
        return min(entries, tail + math.ceil(self.resident_fraction * (entries - tail)))


@dataclass(frozen=True)
class SequenceState:
    """One sequence's state at ``context`` tokens in ``mode``: ``device_bytes`` by kind (see the module docstring),
    ``growth_slack`` (the most amortised growth may add on the device), ``transient_bytes`` (what its prefill adds
    while it runs), ``host_pool_bytes`` (the cold pool's rows, LSA) and ``host_pool_allocated_bytes`` (pinned: the
    Session sizes the pool for the whole conversation)."""

    mode: str
    context: int
    csa_entries: int
    resident_entries: int
    device_bytes: dict[str, int]
    growth_slack: int = 0
    transient_bytes: int = 0
    host_pool_bytes: int = 0
    host_pool_allocated_bytes: int = 0

    @property
    def device_total(self) -> int:
        return sum(self.device_bytes.values())

    @property
    def device_budget(self) -> int:
        """What the plan sets aside per sequence on the device: the state and its possible growth."""
        return self.device_total + self.growth_slack

    def as_dict(self) -> dict:
        return {**asdict(self), "device_total": self.device_total, "device_budget": self.device_budget}


def kv_itemsize(kv_dtype: str) -> int:
    if kv_dtype not in KV_DTYPES:
        raise PlanError(f"--kv-dtype {kv_dtype} is not supported: use bfloat16, float16 or float32")
    return KV_DTYPES[kv_dtype]


def pool_capacity(entries: int) -> int:
    """Rows the cold pool has allocated when ``entries`` is what the conversation (prompt + new tokens) holds:
    ``Session`` allocates ``tokens // m + 1`` rows up front."""
    return entries + 1


def sequence_state(config, context: int, mode: str, lsa: LSASettings | None = None,
                   kv_dtype: str = "bfloat16") -> SequenceState:
    """Bytes one sequence holds after ``context`` tokens (prompt + generated, in a decode step), in ``mode`` full
    (the stock cache) or lsa (the cold-pool cache with a resident set); see the module docstring for each kind."""
    if mode not in MODES:
        raise PlanError(f"mode must be full or lsa, got {mode!r}")
    item = kv_itemsize(kv_dtype)
    lsa = (lsa or LSASettings()).resolved(config)
    hd, ihd, window = config.head_dim, config.index_head_dim, config.sliding_window
    m, m_hca = config.compress_rates[CSA], config.compress_rates[HCA]
    types = config.layer_types
    n_csa, n_hca, n_sliding = types.count(CSA), types.count(HCA), types.count(SLIDING)
    L = int(context)
    entries = L // m
    stored = min(L, window)  # the 127 kept tokens + the step's token: one cat's storage
    device = dict.fromkeys(KINDS, 0)
    device["window"] = (2 * n_sliding + n_csa + n_hca) * stored * hd * item  # sliding layers: K and V apart

    def open_window(rate: int) -> int:  # tokens of the current window, read in the step's cat
        return (L - 1) % rate + 1 if L else 0

    gate_item = 4  # position_bias is fp32, so the overlap gate (gate + bias) is fp32
    csa_open = open_window(m) * 2 * (hd + ihd) * 2 * item  # kv and gate, two series, compressor and indexer
    csa_overlap = m * (hd + ihd) * (item + gate_item) if L >= m else 0
    hca_open = open_window(m_hca) * hd * 2 * item
    device["pending"] = n_csa * (csa_open + csa_overlap) + n_hca * hca_open
    device["hca"] = n_hca * (L // m_hca) * hd * item
    if mode == "full":
        device["csa_kv"] = n_csa * entries * hd * item
        device["csa_index_keys"] = n_csa * entries * ihd * item
        return SequenceState(mode, L, entries, entries, device)
    selected = lsa.selected(entries)
    rows = selected + lsa.tau // m + 2  # ResidentSet: the selection + room for entries born before the next trigger
    device["csa_kv"] = n_csa * rows * hd * item
    device["csa_index_keys"] = n_csa * rows * ihd * item
    keys_layers = lsa.memory_layers if lsa.memory_keys == "device" else 0
    device["memory_index_keys"] = keys_layers * entries * ihd * item
    slack = keys_layers * max(int(entries * GROWTH_SLACK), 64) * ihd * item if keys_layers and entries else 0
    transient = (n_csa - keys_layers) * entries * ihd * item  # prefill: every CSA layer's K^IComp on the device
    per_entry = (hd + ihd) * item if lsa.pool_storage == "model" else \
        sum(width + 4 * -(-width // 64) for width in (hd, ihd))  # fp8: e4m3 bytes + fp32 scale per 64 values
    pool = n_csa * entries * per_entry
    allocated = n_csa * pool_capacity(entries) * per_entry
    return SequenceState(mode, L, entries, selected, device, slack, transient, pool, allocated)


# ---- concurrency ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hardware:
    """The machine: ``gpus`` x ``gpu_memory`` bytes, a per-GPU ``reserve`` (activations, CUDA context, workspace;
    ``reserve_fraction`` of the memory unless ``reserve_bytes`` is given), ``host_memory`` bytes the cold pools may
    pin (None: not checked), and ``kv_placement`` (``split``: each GPU holds its own layers' KV, capacities add up;
    ``replicated``: tensor parallelism keeps every sequence's KV on every GPU)."""

    gpus: int = 1
    gpu_memory: int = 0
    reserve_fraction: float = 0.10
    reserve_bytes: int | None = None
    host_memory: int | None = None
    kv_placement: str = "split"

    def __post_init__(self):
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 1:
            raise PlanError(f"--gpus must be an integer >= 1, got {self.gpus}")
        if not isinstance(self.gpu_memory, int) or self.gpu_memory <= 0:
            raise PlanError(f"--gpu-memory must be a positive size, got {self.gpu_memory}")
        if not 0.0 <= self.reserve_fraction < 1.0:
            raise PlanError(f"--reserve must be a size or a percentage below 100%, got {self.reserve_fraction:.0%}")
        if self.reserve_bytes is not None and not 0 <= self.reserve_bytes < self.gpu_memory:
            raise PlanError(f"--reserve ({human(self.reserve_bytes)}) must be below --gpu-memory "
                            f"({human(self.gpu_memory)})")
        if self.host_memory is not None and self.host_memory <= 0:
            raise PlanError(f"--host-memory must be a positive size, got {self.host_memory}")
        if self.kv_placement not in PLACEMENTS:
            raise PlanError(f"--kv-placement must be split or replicated, got {self.kv_placement!r}")

    @property
    def reserve(self) -> int:
        """Bytes kept free per GPU for everything that is not weights or KV state."""
        if self.reserve_bytes is not None:
            return self.reserve_bytes
        return int(self.gpu_memory * self.reserve_fraction)

    def kv_room(self, weights: WeightPlan) -> int:
        """Bytes of one GPU left for KV state (the weights split evenly over the GPUs)."""
        room = self.gpu_memory - self.reserve - math.ceil(weights.bytes / self.gpus)
        if room <= 0:
            raise PlanError(
                f"the weights do not fit: {human(weights.bytes)} over {self.gpus} GPU(s) is "
                f"{human(math.ceil(weights.bytes / self.gpus))} per GPU, more than the {human(self.gpu_memory)} "
                f"less the {human(self.reserve)} reserve; add GPUs or memory")
        return room

    def as_dict(self) -> dict:
        return {**asdict(self), "reserve": self.reserve}


@dataclass(frozen=True)
class Capacity:
    """Concurrent sequences at ``context`` in ``mode``: ``gpu_sequences`` (device room / per-sequence budget),
    ``host_sequences`` (LSA: host memory / pinned pool per sequence; None when not checked) and the smaller,
    ``sequences``, with ``limit`` naming the factor that sets it."""

    mode: str
    context: int
    sequences: int
    gpu_sequences: int
    host_sequences: int | None
    limit: str
    kv_room_bytes: int


def concurrency(weights: WeightPlan, state: SequenceState, hardware: Hardware) -> Capacity:
    """How many sequences in ``state`` fit beside the weights on ``hardware`` (see the module docstring). One
    sequence's prefill transient is set aside once: sequences prefill one at a time."""
    per_gpu = hardware.kv_room(weights)
    room = per_gpu if hardware.kv_placement == "replicated" else per_gpu * hardware.gpus
    per_sequence = state.device_budget
    gpu = max(0, (room - state.transient_bytes) // per_sequence) if per_sequence else 0
    host = None
    if state.mode == "lsa" and hardware.host_memory is not None and state.host_pool_allocated_bytes:
        host = hardware.host_memory // state.host_pool_allocated_bytes
    sequences = gpu if host is None else min(gpu, host)
    limit = "host memory (cold pool)" if host is not None and host < gpu else "GPU memory"
    return Capacity(state.mode, state.context, int(sequences), int(gpu), host, limit, int(room))


# ---- the plan -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryPlan:
    """Weights, per-sequence state of full and LSA decoding at each context, and (with hardware) concurrency."""

    model: str
    kv_dtype: str
    lsa: LSASettings
    weights: WeightPlan
    states: tuple[tuple[SequenceState, SequenceState], ...]  # (full, lsa) per context
    hardware: Hardware | None = None
    capacities: tuple[tuple[Capacity, Capacity], ...] = ()
    layers: dict = field(default_factory=dict)
    dequantized_bytes: int | None = None  # an FP8/FP4 checkpoint: its weights dequantized to the config's dtype

    def as_dict(self) -> dict:
        out = {"model": self.model, "kv_dtype": self.kv_dtype, "layers": self.layers, "lsa": asdict(self.lsa),
               "weights": self.weights.as_dict(), "dequantized_weight_bytes": self.dequantized_bytes,
               "hardware": self.hardware.as_dict() if self.hardware else None,
               "weights_per_gpu": math.ceil(self.weights.bytes / self.hardware.gpus) if self.hardware else None,
               "contexts": []}
        for i, (full, lsa) in enumerate(self.states):
            row = {"context": full.context, "full": full.as_dict(), "lsa": lsa.as_dict(),
                   "csa_kv_ratio": lsa.device_bytes["csa_kv"] / full.device_bytes["csa_kv"]
                   if full.device_bytes["csa_kv"] else None}
            if self.capacities:
                row["concurrency"] = {c.mode: asdict(c) for c in self.capacities[i]}
            out["contexts"].append(row)
        return out

    def tables(self) -> list:
        """Rich tables: the weights, the state per sequence at each context, and (with hardware) concurrency."""
        from rich.table import Table

        weights = Table(title=f"weights of {self.model} (from its config; no weight read)",
                        caption=self.weights.storage)
        for column in ("tensors", "parameters", "bytes"):
            weights.add_column(column, justify="left" if column == "tensors" else "right")
        for group in self.weights.groups:
            weights.add_row(group.name, f"{group.parameters:,}", human(group.bytes))
        weights.add_row("buffers (hash routing, router bias)", "-", human(self.weights.buffer_bytes))
        weights.add_row("[bold]total[/]", f"[bold]{self.weights.parameters:,}[/]",
                        f"[bold]{human(self.weights.bytes)}[/]")
        if self.hardware is not None:
            weights.add_row(f"per GPU (an even split over {self.hardware.gpus})", "",
                            human(math.ceil(self.weights.bytes / self.hardware.gpus)))
        if self.dequantized_bytes is not None:
            weights.add_row("dequantized instead (where transformers' FP8/FP4 kernels cannot run; not planned)", "",
                            human(self.dequantized_bytes))

        lsa = self.lsa
        where = "on the device" if lsa.memory_keys == "device" else "streamed from the pool"
        state = Table(title=f"KV state per sequence ({self.kv_dtype}); LSA: tail {lsa.keep_recent:,} entries + "
                            f"{lsa.resident_fraction:.1%} of the older ones resident, {lsa.memory_layers} memory "
                            f"layers' keys {where}, tau {lsa.tau}")
        state.add_column("state")
        for full, _ in self.states:
            label = context_label(full.context)
            state.add_column(f"{label} full", justify="right")
            state.add_column(f"{label} LSA", justify="right")
        pairs = self.states

        def row(label, value):
            state.add_row(label, *(text for pair in pairs for text in (value(pair[0]), value(pair[1]))))

        for kind in KINDS:
            row(KIND_LABELS[kind], lambda s, kind=kind: human(s.device_bytes[kind]))
        row("[bold]device total[/]", lambda s: f"[bold]{human(s.device_total)}[/]")
        row("+ growth room (memory keys' amortised growth)", lambda s: human(s.growth_slack) if s.growth_slack else "-")
        row("CSA-KV ratio (the paper's footprint)",
            lambda s: f"{s.device_bytes['csa_kv'] / max(1, self._full_csa(s)):.3f}")
        row("resident / all CSA entries per layer", lambda s: f"{s.resident_entries:,} / {s.csa_entries:,}")
        row("pinned host pool: held / allocated", lambda s: (f"{human(s.host_pool_bytes)} / "
                                                             f"{human(s.host_pool_allocated_bytes)}")
            if s.mode == "lsa" else "-")
        row("while it prefills (every layer's index keys)", lambda s: human(s.transient_bytes) if s.transient_bytes
            else "-")
        tables = [weights, state]
        if self.hardware is not None:
            hw = self.hardware
            placement = ("KV split over the GPUs by layer" if hw.kv_placement == "split"
                         else "KV replicated on every GPU (tensor parallel)")
            host = human(hw.host_memory) if hw.host_memory is not None else "not checked"
            capacity = Table(title=f"concurrent sequences: {hw.gpus} x {human(hw.gpu_memory)}, reserve "
                                   f"{human(hw.reserve)} per GPU, {placement}; host pool limit {host}")
            for column in ("context", "KV room", "full", "LSA", "LSA limited by", "LSA / full"):
                capacity.add_column(column, justify="left" if column in ("context", "LSA limited by") else "right")
            for full, lsa_cap in self.capacities:
                gain = f"{lsa_cap.sequences / full.sequences:.1f}x" if full.sequences else "-"
                capacity.add_row(context_label(full.context), human(full.kv_room_bytes), f"{full.sequences:,}",
                                 f"{lsa_cap.sequences:,}", lsa_cap.limit, gain)
            tables.append(capacity)
        return tables

    def _full_csa(self, state: SequenceState) -> int:
        return next(full.device_bytes["csa_kv"] for full, _ in self.states if full.context == state.context)


def plan_memory(config, contexts, hardware: Hardware | None = None, lsa: LSASettings | None = None,
                kv_dtype: str = "bfloat16", model: str = "") -> MemoryPlan:
    """The whole plan for ``contexts`` (token counts), checked against the model's maximum context."""
    check_deepseek_v4(config)
    kv_itemsize(kv_dtype)
    lsa = (lsa or LSASettings()).resolved(config)
    limit = int(getattr(config, "max_position_embeddings", 0) or 0)
    for context in contexts:
        if limit and context > limit:
            raise PlanError(f"context {context:,} tokens is longer than the model's maximum "
                            f"({limit:,}, max_position_embeddings)")
    weights = count_weights(config)
    dequantized = None
    if getattr(config, "quantization_config", None) is not None:
        plain = copy.copy(config)
        plain.quantization_config = None
        dequantized = count_weights(plain).bytes
    states = tuple((sequence_state(config, c, "full", lsa, kv_dtype), sequence_state(config, c, "lsa", lsa, kv_dtype))
                   for c in contexts)
    capacities = ()
    if hardware is not None:
        hardware.kv_room(weights)  # the weights must fit before anything else is counted
        capacities = tuple(tuple(concurrency(weights, s, hardware) for s in pair) for pair in states)
    types = config.layer_types
    layers = {"sliding": types.count(SLIDING), "csa": types.count(CSA), "hca": types.count(HCA),
              "csa_rate": config.compress_rates[CSA], "hca_rate": config.compress_rates[HCA],
              "sliding_window": config.sliding_window, "head_dim": config.head_dim,
              "index_head_dim": config.index_head_dim}
    return MemoryPlan(model, kv_dtype, lsa, weights, states, hardware, capacities, layers, dequantized)


def check_deepseek_v4(config) -> None:
    if getattr(config, "model_type", None) != "deepseek_v4":
        raise PlanError(f"not a DeepSeek-V4 config (model_type {getattr(config, 'model_type', None)!r})")
    if CSA not in config.layer_types:
        raise PlanError("the config has no compressed sparse attention (CSA) layer: LSA has nothing to offload")


def flash_config():
    """The published DeepSeek-V4-Flash config (transformers' defaults are V4-Flash's dimensions; its layer schedule
    and FP8/FP4 storage from the checkpoint's config.json), for planning without downloading it."""
    from transformers import DeepseekV4Config

    return DeepseekV4Config(compress_ratios=FLASH_COMPRESS_RATIOS, quantization_config=dict(FLASH_QUANTIZATION),
                            expert_dtype="fp4", dtype="bfloat16")


def load_plan_config(model: str):
    """``deepseek-v4-flash`` (the published config, built in), a bundled name or a checkpoint directory (only its
    config.json is read)."""
    if model == FLASH_NAME:
        return flash_config()
    from .backbone import load_config

    config = load_config(model)
    check_deepseek_v4(config)
    return config


# ---- parsing --------------------------------------------------------------------------------------------------

_UNITS = {"": None, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20,
          "gib": 2**30, "tib": 2**40}


def parse_size(text: str, option: str) -> int:
    """``96GiB`` / ``141GB`` / ``1.5TiB`` -> bytes (GB = 10^9, GiB = 2^30); a unit is required."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else ""
    if match is None or unit not in _UNITS or _UNITS[unit] is None:
        raise PlanError(f"{option} {text!r} is not a size: write a number and a unit, e.g. 96GiB or 141GB")
    value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise PlanError(f"{option} {text!r} must be more than 0 bytes")
    return value


def parse_reserve(text: str) -> tuple[float, int | None]:
    """``--reserve``: ``10%`` of each GPU, or a size (``8GiB``). Returns (fraction, bytes or None)."""
    text = str(text).strip()
    if text.endswith("%"):
        try:
            fraction = float(text[:-1]) / 100
        except ValueError:
            raise PlanError(f"--reserve {text!r} is not a percentage (e.g. 10%)") from None
        if not 0 <= fraction < 1:
            raise PlanError(f"--reserve {text!r} must be from 0% to below 100%")
        return fraction, None
    if text in ("0", "0B"):
        return 0.0, 0
    return 0.0, parse_size(text, "--reserve")


def parse_contexts(text: str) -> tuple[int, ...]:
    """``128K,512K,1M`` -> token counts (K = 1,024, M = 1,048,576); plain integers are tokens."""
    contexts = []
    for part in str(text).split(","):
        part = part.strip()
        match = re.fullmatch(r"([0-9]*\.?[0-9]+)([kKmM]?)", part)
        if not match:
            raise PlanError(f"--context {text!r}: each context is a token count like 131072, 128K or 1M")
        scale = {"": 1, "k": 2**10, "m": 2**20}[match.group(2).lower()]
        tokens = float(match.group(1)) * scale
        if tokens != int(tokens) or tokens < 1:
            raise PlanError(f"--context {part!r} is not a whole number of tokens >= 1")
        contexts.append(int(tokens))
    return tuple(contexts)


def human(n: int) -> str:
    """Bytes in binary units (GiB above 1 GiB), as the tables print them."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{n:,} B"


def context_label(tokens: int) -> str:
    """131072 -> 128K, 1048576 -> 1M; other counts as they are."""
    if tokens % 2**20 == 0:
        return f"{tokens // 2**20}M"
    if tokens % 2**10 == 0:
        return f"{tokens // 2**10}K"
    return f"{tokens:,}"
