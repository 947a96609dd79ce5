"""FlashMemory's memory indexer: the trained query tower that decides which compressed entries leave the cold pool.

Per memory-indexer layer L (FlashMemory: 10, 12, 20 on DeepSeek-V4-Flash), for the trigger hidden state h_t
(the attention input of layer L at position t, taken every tau decode steps):

    c       = RMSNorm(W_DQ h_t)                              [r]        (r = rank, default 2048)
    q       = RoPE_t(reshape(W_IUQ c, [H, dh]))               [H, dh]    (the native indexer's rotary)
    w       = W_w h_t * H^-1/2                                [H]
    I[t, s] = sigmoid( sum_h w_h * relu(q_h . k_s) * dh^-1/2 )           (k_s: frozen K^IComp of layer L)

and the entries fetched at t are { s < n_visible(t) : I[t, s] >= threshold at ANY memory layer } (OR).
The keys k_s are the backbone's own compressed indexer keys (after RoPE), exactly what the native Lightning
Indexer scores (DeepSeek-V4 paper, section 2.3.1, eq. 13); only W_DQ (+ its RMSNorm weight), W_IUQ and W_w
are learned. With ``init_from_native`` the four weights are copied from the backbone's ``q_a_proj``,
``q_a_norm``, ``indexer.q_b_proj`` and ``scorer.weights_proj`` (into the leading heads and rank of a wider
tower), and at the native shape sigmoid^-1(I[t, s]) equals the native raw indexer logit.

This module is pure torch (+ transformers' DeepSeek-V4 rotary, + safetensors): it never imports
sentence-transformers, datasets or ``indexer_train``. The export format (``model.safetensors`` +
``lsa_config.json``) is fixed in docs/DESIGN.md ("Export").

Public API (stable; the decoding Session uses it)::

    indexer = MemoryIndexer.from_export(export_dir, device="cpu", backbone_config=None)   # the only export reader
    indexer = load_memory_indexer(export_dir_or_indexer, model)   # checked against the serving backbone
    probs = indexer.score(layer, hidden[R, d], positions[R], keys[T, dh], chunk_size=8192)   # [R, T] fp32
    ids = indexer.fetch({L: h_L[d]}, position, {L: keys_L[T, dh]}, n_visible, threshold=None)  # LongTensor
    logits = indexer.trigger_logits({L: h_L[d]}, position, {L: keys_L[T, dh]}, n_visible,
                                    distance_cap=None)  # {L: [T] fp32}; distance_cap D: far entries scored at D
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import ENSEMBLES, check_threshold
from .errors import FmIndexError, first_line
from .kernels.gated_score import fused_gated_logits, triton_available

EXPORT_FORMAT = "fm-index-lsa/1"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "lsa_config.json"
DEFAULT_CHUNK = 8192


def release_keep_recent(index_topk: int) -> int:
    """The authors' recency tail scaled to a backbone: 2,048 entries on V4-Flash, 4 x its native top-k of 512;
    4 x index_topk elsewhere (``reference``'s top-64: 256 entries = 1,024 tokens; ``tiny``'s top-16: 64)."""
    return 4 * int(index_topk)


class ExportError(FmIndexError):
    """A memory-indexer export that is missing, corrupt, or made for another backbone."""


@dataclass(frozen=True)
class MemoryIndexerConfig:
    """Everything that shapes the memory indexer; stored as ``lsa_config.json`` (plus ``metrics``).

    ``rope`` is the backbone's ``rope_parameters["compress"]`` dict and ``rope_head_dim_base`` the backbone's
    attention ``head_dim`` that its ``partial_rotary_factor`` applies to (so the rotary covers ``rope_dim``
    channels, exactly as in the native indexer).
    """

    layers: tuple[int, ...]
    rank: int
    hidden_size: int
    index_n_heads: int
    index_head_dim: int
    rope_dim: int
    rope: dict
    rope_head_dim_base: int
    max_position_embeddings: int
    compress_rate: int = 4
    rms_norm_eps: float = 1e-6
    threshold: float = 0.5
    tau: int = 64
    backbone_config_hash: str = ""
    # the serving backbone's indexer keys it was trained against (lsa_runtime.key_digest; "": unknown, unchecked)
    backbone_keys_sha256: str = ""
    metrics: dict = field(default_factory=dict, compare=False)
    csa_indices: tuple[int, ...] = field(default=(), compare=False)  # ``layers`` in the release's CSA numbering
    keep_recent: int = 0  # the resident set's recency tail: the newest entries, always resident
    keep_first: int = 0  # its sink: the first entries, always resident
    ensemble: str = "max"  # how the layers' scores combine: max (the OR rule) or mean
    # a floor under the threshold: each memory layer's fetch_top best-scored entries are fetched whatever their
    # score (0: the release's threshold alone; lsa_runtime.policies.MemoryIndexerPolicy)
    fetch_top: int = 0
    # each entry the threshold or the floor selects brings this many entries on either side of it (0: off, the
    # release's single entries; ours, lsa_runtime.policies.MemoryIndexerPolicy)
    fetch_neighbours: int = 0
    # the longest trigger-to-entry distance (tokens) in its training labels: the last trigger position t0 of its
    # training documents (0: unknown, an export from before it was recorded); what distance_cap "trained" uses
    trained_distance: int = field(default=0, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "layers", tuple(sorted(int(x) for x in self.layers)))
        object.__setattr__(self, "csa_indices", tuple(int(x) for x in self.csa_indices))
        if not self.layers:
            raise FmIndexError("the memory indexer needs at least one layer")
        if self.rank < 1:
            raise FmIndexError(f"rank must be >= 1, got {self.rank}")
        object.__setattr__(self, "threshold", check_threshold(self.threshold))
        for name in ("keep_recent", "keep_first", "fetch_top", "fetch_neighbours"):
            if int(getattr(self, name)) < 0:
                raise FmIndexError(f"{name} must be >= 0 entries, got {getattr(self, name)}")
        if self.ensemble not in ENSEMBLES:
            raise FmIndexError(f"ensemble must be max or mean, got {self.ensemble!r}")
        if isinstance(self.trained_distance, bool) or int(self.trained_distance) != self.trained_distance \
                or int(self.trained_distance) < 0:
            raise FmIndexError(f"trained_distance must be a number of tokens >= 0, got {self.trained_distance!r}")
        object.__setattr__(self, "trained_distance", int(self.trained_distance))

    @classmethod
    def from_backbone_config(cls, config, layers, rank: int = 2048, tau: int = 64, threshold: float = 0.5):
        """From a ``DeepseekV4Config`` (its config only: no weights are loaded)."""
        from .backbone import config_hash, csa_index, csa_rate

        rope = dict(config.rope_parameters["compress"])
        return cls(layers=tuple(layers), csa_indices=tuple(csa_index(config, L) for L in sorted(layers)),
                   keep_recent=release_keep_recent(config.index_topk), rank=rank, hidden_size=config.hidden_size,
                   index_n_heads=config.index_n_heads, index_head_dim=config.index_head_dim,
                   rope_dim=int(config.head_dim * rope.get("partial_rotary_factor", 1.0)), rope=rope,
                   rope_head_dim_base=int(config.head_dim), max_position_embeddings=config.max_position_embeddings,
                   compress_rate=csa_rate(config), rms_norm_eps=float(config.rms_norm_eps), threshold=threshold,
                   tau=tau, backbone_config_hash=config_hash(config))

    @classmethod
    def from_label_manifest(cls, manifest: dict, layers, rank: int = 2048, threshold: float = 0.5,
                            heads: int | None = None):
        """From a label-shard ``manifest.json`` (docs/DESIGN.md, "Label shards"): training never loads the backbone.
        ``heads``: the tower's query heads (default: the backbone's index heads; the release uses 128)."""
        bb = manifest["backbone"]
        rope = dict(bb["rope"])
        prf = float(rope.get("partial_rotary_factor", 1.0))
        csa = [int(x) for x in bb.get("csa_layers", [])]
        indices = tuple(csa.index(int(L)) for L in sorted(layers)) if all(int(L) in csa for L in layers) else ()
        return cls(layers=tuple(layers), csa_indices=indices, keep_recent=release_keep_recent(int(bb["index_topk"])),
                   rank=rank, hidden_size=int(bb["hidden_size"]),
                   index_n_heads=int(heads or bb["index_n_heads"]), index_head_dim=int(bb["index_head_dim"]),
                   rope_dim=int(bb["rope_dim"]), rope=rope, rope_head_dim_base=int(round(bb["rope_dim"] / prf)),
                   max_position_embeddings=int(bb.get("max_position_embeddings", 1 << 20)),
                   compress_rate=int(bb["compress_rate"]), rms_norm_eps=float(bb.get("rms_norm_eps", 1e-6)),
                   threshold=threshold, tau=int(manifest["params"]["tau"]), backbone_config_hash=bb["config_hash"],
                   backbone_keys_sha256=str(bb.get("index_keys_sha256", "")))

    def to_json(self) -> dict:
        """The ``lsa_config.json`` dict (docs/DESIGN.md, "Export")."""
        out = asdict(self)
        out["layers"] = list(self.layers)
        out["csa_indices"] = list(self.csa_indices)
        if not self.trained_distance:  # unknown: written as before the field existed
            del out["trained_distance"]
        if not self.fetch_neighbours:  # off: written as before the field existed
            del out["fetch_neighbours"]
        return {"format": EXPORT_FORMAT, **out}

    @classmethod
    def from_json(cls, blob: dict) -> "MemoryIndexerConfig":
        blob = dict(blob)
        if blob.pop("format", EXPORT_FORMAT) != EXPORT_FORMAT:
            raise ExportError(f"not an fm-index memory-indexer config (format {blob.get('format')!r})")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in blob.items() if k in known})

    def with_metrics(self, metrics: dict) -> "MemoryIndexerConfig":
        return MemoryIndexerConfig(**{**asdict(self), "metrics": dict(metrics)})


class IndexerRotary(nn.Module):
    """The native Lightning Indexer's query RoPE: transformers' ``DeepseekV4RotaryEmbedding`` with the backbone's
    ``compress`` rope parameters and ``apply_rotary_pos_emb`` (interleaved, on the trailing ``rope_dim`` channels).

    A minimal ``DeepseekV4Config`` is rebuilt from the stored rope settings; no backbone weight is touched.
    """

    def __init__(self, config: MemoryIndexerConfig):
        super().__init__()
        from transformers import DeepseekV4Config
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4RotaryEmbedding

        rope = dict(config.rope)
        prf = float(rope.get("partial_rotary_factor", 1.0))
        backbone_like = DeepseekV4Config(
            hidden_size=config.hidden_size, head_dim=config.rope_head_dim_base, num_hidden_layers=1,
            layer_types=["compressed_sparse_attention"], mlp_layer_types=["moe"], partial_rotary_factor=prf,
            max_position_embeddings=config.max_position_embeddings,
            rope_parameters={"main": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": prf},
                             "compress": rope},
        )
        self.rotary = DeepseekV4RotaryEmbedding(backbone_like)
        if 2 * self.rotary.compress_inv_freq.numel() != config.rope_dim:
            raise ExportError(f"rope settings give {2 * self.rotary.compress_inv_freq.numel()} rotary channels, "
                              f"config says rope_dim={config.rope_dim}")

    def forward(self, q: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """q [R, H, dh] at absolute positions [R] -> RoPE_t(q) [R, H, dh] (same dtype)."""
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import apply_rotary_pos_emb

        # position_ids as [batch=1, seq=R]: the layout every transformers version's rotary accepts (5.17 needs 2-D)
        position_ids = positions.to(q.device).long().reshape(1, -1)
        cos, sin = self.rotary(q, position_ids=position_ids, layer_type="compress")  # [1, R, rd/2]
        return apply_rotary_pos_emb(q, cos[0], sin[0], unsqueeze_dim=1)  # cos -> [R, 1, rd]

    def shift(self, keys: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """keys [T, dh] after RoPE at positions p_s -> the same keys as if at p_s + offsets[s] (same dtype).

        A pure rotation by offsets * theta_i on each interleaved pair of the trailing ``rope_dim`` channels, without
        the rotary's attention scaling (the keys carry it already): rotations compose, R(a) R(b) k = R(a + b) k.
        """
        from transformers.models.deepseek_v4.modeling_deepseek_v4 import apply_rotary_pos_emb

        inv_freq = self.rotary.compress_inv_freq.to(keys.device)
        angles = offsets.to(device=keys.device, dtype=torch.float64)[:, None] * inv_freq.double()[None, :]
        cos, sin = angles.cos().float(), angles.sin().float()  # fp64 angles: offsets reach 1e6 tokens
        return apply_rotary_pos_emb(keys.unsqueeze(1), cos, sin, unsqueeze_dim=1).squeeze(1)


class LatentRMSNorm(nn.Module):
    """RMSNorm on the rank-r latent W_DQ h_t with a learned weight, computed as the native ``q_a_norm`` does
    (fp32 statistics, fp32 weight, one cast at the end)."""

    def __init__(self, rank: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(rank))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return latent_rms_norm(x, self.weight, self.eps)


def latent_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in fp32, times the fp32 ``weight`` (``[r]``, or ``[n, r]`` row by row), cast back."""
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * x).to(dtype)


class MemoryIndexerLayer(nn.Module):
    """The memory indexer of one layer L: W_DQ (d -> r), latent_norm, W_IUQ (r -> H*dh), W_w (d -> H) and RoPE."""

    def __init__(self, config: MemoryIndexerConfig, rotary: IndexerRotary | None = None):
        super().__init__()
        d, r, H, dh = config.hidden_size, config.rank, config.index_n_heads, config.index_head_dim
        self.n_heads, self.head_dim = H, dh
        self.W_DQ = nn.Linear(d, r, bias=False)
        self.latent_norm = LatentRMSNorm(r, config.rms_norm_eps)
        self.W_IUQ = nn.Linear(r, H * dh, bias=False)
        self.W_w = nn.Linear(d, H, bias=False)
        self.rotary = rotary if rotary is not None else IndexerRotary(config)
        self.softmax_scale = dh ** -0.5
        self.weights_scaling = H ** -0.5

    def query(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """h_t [R, d], t [R] -> (q [R, H, dh] after RoPE_t, w [R, H] fp32 = W_w h_t * H^-1/2)."""
        hidden = hidden.to(self.W_DQ.weight.dtype)
        latent = self.latent_norm(self.W_DQ(hidden))  # [R, r]
        q = self.W_IUQ(latent).view(hidden.shape[0], self.n_heads, self.head_dim)  # [R, H, dh]
        q = self.rotary(q, positions)
        w = self.W_w(hidden).float() * self.weights_scaling  # [R, H]
        return q, w

    def logits_from_query(self, q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor,
                          chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
        """Raw scores sum_h w_h relu(q_h . k_s) dh^-1/2 of R queries over T keys: fp32 [R, T].

        The fused kernel (GPU) never materialises [R, H, T] and scores all entries in one launch; the torch
        path scores ``chunk_size`` entries at a time, so at most [R, H, chunk_size] is alive in the forward and
        in the backward (only q, w, keys are saved for autograd).
        """
        keys = keys.to(device=q.device, dtype=q.dtype)
        t_len = keys.shape[0]
        if t_len == 0:
            return q.new_zeros(q.shape[0], 0, dtype=torch.float32)
        if triton_available(q.device, q.shape[-1]):
            chunk_size = t_len
        parts = [fused_gated_logits(q, w, keys[start : start + chunk_size], self.softmax_scale)
                 for start in range(0, t_len, max(1, int(chunk_size)))]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def logits(self, hidden, positions, keys, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
        """sigmoid^-1 I[t, s] for R trigger states over T entries: fp32 [R, T]."""
        q, w = self.query(hidden, positions)
        return self.logits_from_query(q, w, keys, chunk_size)

    @torch.no_grad()
    def copy_native(self, attention) -> None:
        """Copy W_DQ, latent_norm, W_IUQ, W_w from a backbone layer's ``self_attn`` (a CSA layer). A tower wider
        than the native indexer (more heads, a larger rank) gets the native weights in its leading heads and rank
        and keeps its own initialisation elsewhere, as the authors' release initialises its 128-head,
        rank-2,048 retriever from the native 64 heads and rank 1,024."""
        indexer = attention.compressor.indexer
        self.copy_native_weights({"q_a": attention.q_a_proj.weight, "q_norm": attention.q_a_norm.weight,
                                  "q_b": indexer.q_b_proj.weight, "weights_proj": indexer.scorer.weights_proj.weight})

    @torch.no_grad()
    def copy_native_weights(self, native: dict[str, torch.Tensor]) -> None:
        """:meth:`copy_native` from the tensors themselves (``backbone.read_native_indexer``): q_a -> W_DQ, q_norm
        -> latent_norm, q_b -> W_IUQ, weights_proj -> W_w, into the leading rows and columns."""
        for mine, theirs in [(self.W_DQ.weight, native["q_a"]), (self.latent_norm.weight, native["q_norm"]),
                             (self.W_IUQ.weight, native["q_b"]), (self.W_w.weight, native["weights_proj"])]:
            if any(m < t for m, t in zip(mine.shape, theirs.shape)):
                raise FmIndexError(f"init native: the tower's {tuple(mine.shape)} is smaller than the backbone's "
                                   f"{tuple(theirs.shape)}: --rank must be >= the backbone's q_lora_rank and "
                                   "--heads >= its index heads")
            mine[tuple(slice(0, n) for n in theirs.shape)] = theirs.to(device=mine.device, dtype=mine.dtype)


class MemoryIndexer(nn.Module):
    """All memory-indexer layers of one backbone, keyed by layer index, plus the OR-union fetch rule."""

    def __init__(self, config: MemoryIndexerConfig):
        super().__init__()
        self.config = config
        rotary = IndexerRotary(config)  # shared: it holds only non-persistent rope buffers
        self.layers = nn.ModuleDict({str(L): MemoryIndexerLayer(config, rotary) for L in config.layers})
        self.cuda_graphs = True  # replay the trigger towers as one CUDA graph on a GPU (trigger_queries)
        self._tower_graph = None  # (key, TriggerTowerGraph) once captured

    # -- construction -----------------------------------------------------------------------------------
    @classmethod
    def init_from_native(cls, model, config: MemoryIndexerConfig) -> "MemoryIndexer":
        """The ablation start point: every layer's weights copied from the backbone's own indexer path."""
        indexer = cls(config)
        decoder = model.model if hasattr(model, "model") else model
        for L in config.layers:
            indexer.layer(L).copy_native(decoder.layers[L].self_attn)
        return indexer

    @classmethod
    def init_from_checkpoint(cls, name_or_path, config: MemoryIndexerConfig) -> "MemoryIndexer":
        """:meth:`init_from_native` from the checkpoint's files alone (no backbone is loaded: V4-Flash works on any
        machine; FP8 weights dequantized with their scales)."""
        from .backbone import read_native_indexer

        indexer = cls(config)
        for L, native in read_native_indexer(name_or_path, config.layers).items():
            indexer.layer(L).copy_native_weights(native)
        return indexer

    def layer(self, layer: int) -> MemoryIndexerLayer:
        key = str(int(layer))
        if key not in self.layers:
            raise FmIndexError(f"layer {layer} is not a memory-indexer layer of this indexer "
                               f"({list(self.config.layers)})")
        return self.layers[key]

    # -- scoring ----------------------------------------------------------------------------------------
    def logits(self, layer: int, hidden: torch.Tensor, positions, keys: torch.Tensor,
               chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
        """sigmoid^-1 I[t, s]: hidden [R, d], positions [R], keys [T, dh] -> fp32 [R, T]."""
        positions = torch.as_tensor(positions, device=hidden.device).reshape(-1)
        return self.layer(layer).logits(hidden, positions, keys, chunk_size)

    def score(self, layer: int, hidden: torch.Tensor, positions, keys: torch.Tensor,
              chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
        """I[t, s] = sigmoid(...) in [0, 1]: hidden [R, d], positions [R], keys [T, dh] -> fp32 [R, T].

        The caller passes the keys a trigger may see (``keys[:n_visible]``); rows share the keys.
        """
        return torch.sigmoid(self.logits(layer, hidden, positions, keys, chunk_size))

    @torch.no_grad()
    def trigger_queries(self, hiddens_by_layer: dict, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The towers of all memory layers on their trigger states h_t (one per layer, same t), batched.

        Returns q [n_layers, H, dh] (after RoPE_t) and w [n_layers, H] fp32, rows in ``config.layers`` order;
        row i is ``layer(L_i).query(h_{L_i}, [t])`` computed by the same operations (bit for bit on CPU; a GPU
        reduction over more rows may round differently): the projections run per layer (their weights
        differ), while the RMSNorm, RoPE and scaling run once over all rows, and the position is built on the
        device (no synchronising host->device copy). On a GPU the whole tower pass is replayed as one CUDA graph
        (:mod:`lsa_runtime.tower_graph`; same kernels, bit-identical results) unless ``cuda_graphs`` is False.
        """
        first = self.layer(self.config.layers[0])
        dtype = first.W_DQ.weight.dtype
        device = first.W_DQ.weight.device  # each h_L comes from its layer's device (a model spread over devices)
        hidden = torch.stack([torch.as_tensor(hiddens_by_layer[L]).reshape(-1).to(device) for L in self.config.layers])
        hidden = hidden.to(dtype=dtype)
        if hidden.device.type == "cuda" and self.cuda_graphs:
            return self._tower_graph_for(hidden)(hidden, position)
        positions = torch.full((hidden.shape[0],), int(position), dtype=torch.long, device=hidden.device)
        return self._towers(hidden, positions)

    def _towers(self, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [n_layers, d] (row i = h_t of layer L_i), positions [n_layers] -> (q [n, H, dh], w [n, H])."""
        layers = [self.layer(L) for L in self.config.layers]
        # each row in a tensor of its own, as query() sees it: a CPU GEMM may sum in another order for a row that
        # starts at an unaligned offset inside a larger tensor, and the towers must equal query() bit for bit
        rows = [hidden[i : i + 1].clone() for i in range(len(layers))]
        latent = torch.cat([m.W_DQ(rows[i]) for i, m in enumerate(layers)])  # [n, r]
        norm_w = torch.stack([m.latent_norm.weight for m in layers])
        latent = latent_rms_norm(latent, norm_w, layers[0].latent_norm.eps)  # each layer's norm, row by row
        first = layers[0]
        q = torch.cat([m.W_IUQ(c) for m, c in zip(layers, latent.unsqueeze(1))])
        q = q.view(len(layers), first.n_heads, first.head_dim)
        q = first.rotary(q, positions)  # shared rotary module, same t for every row
        w = torch.cat([m.W_w(rows[i]) for i, m in enumerate(layers)]).float() * first.weights_scaling
        return q, w

    def _tower_graph_for(self, hidden: torch.Tensor):
        from .tower_graph import TriggerTowerGraph, graph_key

        key = graph_key(self, hidden.device, hidden.dtype)
        if self._tower_graph is None or self._tower_graph[0] != key:
            self._tower_graph = None  # free the old graph's memory first
            graph = TriggerTowerGraph(self._towers, hidden.shape[0], hidden.shape[1], hidden.dtype, hidden.device)
            self._tower_graph = (key, graph)
        return self._tower_graph[1]

    @property
    def tower_graph(self):
        """The captured :class:`~.tower_graph.TriggerTowerGraph` (None until a trigger ran on a GPU with
        ``cuda_graphs``)."""
        return self._tower_graph[1] if self._tower_graph is not None else None

    def __getstate__(self):  # deepcopy / pickle: a captured graph does not travel
        return {**self.__dict__, "_tower_graph": None}

    def capped_keys(self, keys: torch.Tensor, position: int, distance_cap: int | None) -> torch.Tensor:
        """K^IComp [T, dh] as a trigger at ``position`` scores them under a distance cap D: entry s (RoPE'd at its
        first token, compress_rate * s) farther than D tokens from the trigger moved to position t - D, so that
        q(t) . k_s sees the relative distance D, a distance the tower was trained at, instead of one it never saw
        (docs/RESULTS.md, section 11g: past its training length the rotary part alone lifts far entries over the
        threshold). Content still ranks the far entries; their order by distance is given up. Nearer entries, and
        all of them when D is None, are returned as they are (no copy)."""
        if not distance_cap:
            return keys
        rate = self.config.compress_rate
        far = min(keys.shape[0], max(0, -(-(int(position) - int(distance_cap)) // rate)))  # rate*s < t - D
        if far == 0:
            return keys
        rotary = self.layer(self.config.layers[0]).rotary
        offsets = (int(position) - int(distance_cap)) - rate * torch.arange(far, dtype=torch.long)
        return torch.cat([rotary.shift(keys[:far], offsets), keys[far:]])

    @torch.no_grad()
    def trigger_logits(self, hiddens_by_layer: dict, position: int, keys_by_layer: dict,
                       n_visible: int | None = None, chunk_size: int = DEFAULT_CHUNK,
                       distance_cap: int | None = None) -> dict[int, torch.Tensor]:
        """sigmoid^-1 I_L[t, s] of every memory layer L at trigger ``position``: {L: fp32 [n_visible]}.

        ``hiddens_by_layer[L]``: h_t [d]; ``keys_by_layer[L]``: K^IComp [>= n_visible, dh]. One batched tower
        pass (:meth:`trigger_queries`), then one scoring launch per layer (its own keys). A layer's keys stay on their
        device (a backbone spread over devices keeps them beside their layer): its query and head weights go there,
        and only the [n_visible] logits come back to the towers' device. ``distance_cap`` D (tokens; None: off):
        entries farther than D are scored as if D away (:meth:`capped_keys`)."""
        if n_visible is None:
            n_visible = (int(position) + 1) // self.config.compress_rate
        q, w = self.trigger_queries(hiddens_by_layer, position)
        out = {}
        for i, L in enumerate(self.config.layers):
            layer = self.layer(L)
            keys = self.capped_keys(keys_by_layer[L][:n_visible], position, distance_cap)
            here = keys.device
            logits = layer.logits_from_query(q[i : i + 1].to(here), w[i : i + 1].to(here), keys, chunk_size)[0]
            out[int(L)] = logits.to(q.device)  # no-ops unless the backbone spans devices
        return out

    @torch.no_grad()
    def fetch(self, hiddens_by_layer: dict, position: int, keys_by_layer: dict, n_visible: int | None = None,
              threshold: float | None = None, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
        """Entries to fetch at trigger ``position``: sorted LongTensor of s < n_visible with I[t, s] >= threshold
        at ANY memory layer (OR-union). ``hiddens_by_layer[L]``: h_t [d]; ``keys_by_layer[L]``: [>= n_visible, dh].
        ``chunk_size`` bounds memory on the torch (CPU) path only."""
        threshold = self.config.threshold if threshold is None else float(threshold)
        if n_visible is None:
            n_visible = (int(position) + 1) // self.config.compress_rate
        if not self.config.layers or n_visible <= 0:
            return torch.zeros(0, dtype=torch.long)
        selected = None
        for logits in self.trigger_logits(hiddens_by_layer, position, keys_by_layer, n_visible, chunk_size).values():
            hit = torch.sigmoid(logits) >= threshold
            selected = hit if selected is None else selected | hit.to(selected.device)
        return torch.nonzero(selected, as_tuple=False).reshape(-1).cpu()

    # -- export -----------------------------------------------------------------------------------------
    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """``layers.{L}.W_DQ.weight`` ... as contiguous CPU fp32 tensors (rope buffers are not weights)."""
        return {name: t.detach().float().cpu().contiguous() for name, t in self.state_dict().items()}

    def save_export(self, directory: str | Path, metrics: dict | None = None) -> Path:
        """Write ``model.safetensors`` + ``lsa_config.json`` atomically (temp dir, then rename)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        if directory.exists() and any(directory.iterdir()):
            raise ExportError(f"export directory {directory} exists and is not empty")
        directory.parent.mkdir(parents=True, exist_ok=True)
        config = self.config.with_metrics(metrics if metrics is not None else self.config.metrics)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
        try:
            save_file(self.export_state_dict(), str(tmp / WEIGHTS_NAME), metadata={"format": EXPORT_FORMAT})
            (tmp / CONFIG_NAME).write_text(json.dumps(config.to_json(), indent=2, sort_keys=True) + "\n")
            umask = os.umask(0)
            os.umask(umask)
            for path in (tmp, tmp / WEIGHTS_NAME, tmp / CONFIG_NAME):  # mkdtemp makes 0700: use the usual modes
                os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)
            if directory.exists():
                directory.rmdir()
            os.replace(tmp, directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return directory

    @classmethod
    def from_export(cls, directory: str | Path, expected_config_hash: str | None = None,
                    device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    backbone_config=None) -> "MemoryIndexer":
        """Load an export (torch + safetensors only): the only export reader. ``expected_config_hash``: the serving
        backbone's ``lsa_runtime.backbone.config_hash``; ``backbone_config``: the serving backbone's config, which
        the export must fit (config hash, CSA layers, indexer geometry: :func:`check_fits`). Any problem is an
        :class:`ExportError` naming it."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory).expanduser()
        cfg_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        if not directory.is_dir():
            raise ExportError(f"indexer export {directory} is not a directory")
        for path in (cfg_path, weights_path):
            if not path.is_file():
                raise ExportError(f"{directory} is not a memory-indexer export: no {path.name} (run `fm-index export`)")
        try:
            config = MemoryIndexerConfig.from_json(json.loads(cfg_path.read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as exc:
            raise ExportError(f"corrupt {cfg_path}: {first_line(exc)}") from None
        if expected_config_hash is not None and config.backbone_config_hash != expected_config_hash:
            raise ExportError(f"the memory indexer in {directory} was exported for another backbone (config hash "
                              f"{config.backbone_config_hash}), not this backbone ({expected_config_hash})")
        if backbone_config is not None:
            check_fits(config, backbone_config, where=str(cfg_path))
        indexer = cls(config)
        try:
            state = load_file(str(weights_path))
        except (SafetensorError, OSError) as exc:
            raise ExportError(f"corrupt {weights_path}: {first_line(exc)}") from None
        expected = set(indexer.state_dict())
        if set(state) != expected:
            missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
            raise ExportError(f"{weights_path} does not match {CONFIG_NAME}: missing {missing[:3]}, "
                              f"unexpected {extra[:3]}")
        try:
            indexer.load_state_dict(state)
        except RuntimeError as exc:
            raise ExportError(f"{weights_path} does not match {CONFIG_NAME}: {str(exc).splitlines()[-1]}") from None
        indexer.to(device=device)
        for module in indexer.modules():  # only the projections: rope buffers and the RMSNorm weight stay fp32
            if isinstance(module, nn.Linear):
                module.weight.data = module.weight.data.to(dtype)
        return indexer.eval()


def check_fits(config: MemoryIndexerConfig, backbone_config, where: str = "the memory indexer") -> None:
    """Refuse (:class:`ExportError`) a memory indexer made for another backbone: another config hash, a layer that
    is not a CSA layer of this backbone, or another key geometry (head dim, hidden size). The number of query
    heads is the tower's own (the release's retriever has 128 against the native 64)."""
    from .backbone import config_hash, validate_memory_layers

    have = config_hash(backbone_config)
    if config.backbone_config_hash and config.backbone_config_hash != have:
        raise ExportError(f"{where} was exported for another backbone (config hash {config.backbone_config_hash}, "
                          f"this model has {have})")
    try:
        validate_memory_layers(backbone_config, config.layers)
    except FmIndexError as exc:
        raise ExportError(f"{where}: {exc}") from None
    for key, value in (("index_head_dim", backbone_config.index_head_dim),
                       ("hidden_size", backbone_config.hidden_size)):  # the tower's heads are its own
        if int(getattr(config, key)) != int(value):
            raise ExportError(f"{where}: {key} is {getattr(config, key)}, the backbone has {value}")


def load_memory_indexer(source, model) -> "MemoryIndexer":
    """The memory indexer serving ``model``: an ``fm-index export`` directory, the authors' release checkpoint (a
    ``.pt`` file, :mod:`~.release_format`), or a :class:`MemoryIndexer` already loaded; checked against the
    backbone (:func:`check_fits`) and moved to where the model takes its input."""
    from .placement import execution_device

    decoder = model.model if hasattr(model, "model") else model
    device = execution_device(decoder.embed_tokens)
    if isinstance(source, MemoryIndexer):
        check_fits(source.config, model.config)
        indexer = source.to(device).eval()
    else:
        indexer = read_memory_indexer(source, model.config, device=device)
    check_keys(indexer.config, model, where=str(source) if isinstance(source, (str, Path)) else "the memory indexer")
    return indexer


def check_keys(config: MemoryIndexerConfig, model, where: str = "the memory indexer") -> None:
    """Refuse (:class:`ExportError`) a memory indexer trained against other Lightning Indexer keys than ``model``'s
    (:mod:`.key_digest`: same config, other weights); nothing is checked where either digest is unknown."""
    from .key_digest import index_keys_digest

    if not config.backbone_keys_sha256:
        return
    have = index_keys_digest(model, config.layers)
    if have and have != config.backbone_keys_sha256:
        raise ExportError(f"{where} was trained against other weights of this backbone: the Lightning Indexer keys "
                          f"of layers {list(config.layers)} differ (sha256 {config.backbone_keys_sha256[:12]}..., "
                          f"this model has {have[:12]}...); re-build its labels and train it for this model")


def read_memory_indexer(source: str | Path, backbone_config, device: str | torch.device = "cpu") -> "MemoryIndexer":
    """An ``fm-index export`` directory or the authors' release checkpoint (a ``.pt`` file), read for a backbone
    of config ``backbone_config`` (no backbone weights needed); a misfit is an :class:`ExportError`."""
    if not isinstance(source, (str, Path)):
        raise ExportError("indexer must be an export directory, a release checkpoint (.pt) or a MemoryIndexer")
    if Path(source).expanduser().is_file():
        from .release_format import load_release_checkpoint

        return load_release_checkpoint(source, backbone_config, device=device)
    return MemoryIndexer.from_export(source, device=device, backbone_config=backbone_config)


def sigmoid_inverse(p: torch.Tensor) -> torch.Tensor:
    """logit(p) = log(p / (1 - p)); used to compare memory scores with native raw logits."""
    p = p.double()
    return torch.log(p) - torch.log1p(-p)


__all__ = ["MemoryIndexer", "MemoryIndexerLayer", "MemoryIndexerConfig", "IndexerRotary", "ExportError",
           "check_fits", "check_keys", "load_memory_indexer", "read_memory_indexer", "sigmoid_inverse", "EXPORT_FORMAT", "CONFIG_NAME", "WEIGHTS_NAME"]
