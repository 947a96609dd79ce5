"""The authors' release of FlashMemory-DeepSeek-V4: its retriever checkpoint, read and written as a MemoryIndexer.

Their joint checkpoint (``torch.save`` of a state dict, e.g. ``top3_R930_joint.pt``) holds per memory layer,
keyed by its index in the list of CSA layers (``l10``, ``l12``, ``l20`` on V4-Flash = model layers 22, 26, 42):

    retrievers.l{i}.wq_a.weight          [r, d]       = W_DQ
    retrievers.l{i}.q_norm_weight        [r]          = the latent RMSNorm's weight (eps 1e-6)
    retrievers.l{i}.wq_b.weight          [H * 128, r] = W_IUQ
    retrievers.l{i}.weights_proj.weight  [H, d]       = W_w
    retrievers.l{i}.freqs_cis            (optional)   their RoPE table; the serving code rebuilds it, so do we

and scores exactly as :class:`~.memory_indexer.MemoryIndexer` does: w = W_w h * 128^-1/2 * H^-1/2 (our
H^-1/2 on w and dh^-1/2 on the dot products), sigmoid of sum_h w_h relu(q_h . k_s). Their RoPE is YaRN
(base 160,000, factor 16, original length 65,536, beta_fast 32, beta_slow 1, no attention scaling) on the last 64
of the 128 query dims, in interleaved pairs, which is transformers' DeepSeek-V4 rotary with those parameters
(:data:`RELEASE_ROPE`). They also rotate q and the index keys by the same Hadamard matrix, which cancels in
q . k: our keys come unrotated from transformers and our queries are not rotated either.

Reading uses ``torch.load(weights_only=True)``: a checkpoint cannot run code.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from .errors import FmIndexError, first_line
from .memory_indexer import ExportError, MemoryIndexer, MemoryIndexerConfig, release_keep_recent

RELEASE_HEAD_DIM = 128
RELEASE_ROPE_DIM = 64
# transformers' rope parameters for the release's query RoPE; partial_rotary_factor is relative to the backbone's
# attention head_dim (512 on V4-Flash), which MemoryIndexerConfig.rope_head_dim_base records.
RELEASE_ROPE = {"rope_type": "yarn", "rope_theta": 160000.0, "factor": 16.0,
                "original_max_position_embeddings": 65536, "beta_fast": 32.0, "beta_slow": 1.0,
                "attention_factor": 1.0}
RELEASE_MAX_POSITION = 1 << 20  # their SGLANG_RETRIEVER_MAX_POSITION default
_KEY = re.compile(r"^retrievers\.l(\d+)\.(wq_a\.weight|q_norm_weight|wq_b\.weight|weights_proj\.weight|freqs_cis)$")
_OURS = {"wq_a.weight": "W_DQ.weight", "q_norm_weight": "latent_norm.weight", "wq_b.weight": "W_IUQ.weight",
         "weights_proj.weight": "W_w.weight"}


def release_config(backbone_config, csa_indices, rank: int, heads: int) -> MemoryIndexerConfig:
    """The MemoryIndexerConfig of a release retriever on ``backbone_config`` (release RoPE, eps, tail)."""
    from .backbone import config_hash, csa_layers, csa_rate, resolve_csa_indices

    layers = resolve_csa_indices(backbone_config, csa_indices)
    head_dim = int(backbone_config.head_dim)
    rope = {**RELEASE_ROPE, "partial_rotary_factor": RELEASE_ROPE_DIM / head_dim}
    csa = csa_layers(backbone_config)
    return MemoryIndexerConfig(
        layers=tuple(layers), csa_indices=tuple(csa.index(L) for L in sorted(layers)), rank=rank,
        hidden_size=int(backbone_config.hidden_size), index_n_heads=heads, index_head_dim=RELEASE_HEAD_DIM,
        rope_dim=RELEASE_ROPE_DIM, rope=rope, rope_head_dim_base=head_dim, max_position_embeddings=RELEASE_MAX_POSITION,
        compress_rate=csa_rate(backbone_config), rms_norm_eps=1e-6, threshold=0.5, tau=64,
        backbone_config_hash=config_hash(backbone_config), keep_recent=release_keep_recent(backbone_config.index_topk))


def load_release_checkpoint(path: str | Path, backbone_config, device: str | torch.device = "cpu") -> MemoryIndexer:
    """A MemoryIndexer from the release's joint checkpoint, for ``backbone_config`` (V4-Flash's, or a backbone with
    the same key geometry). Wrong keys, shapes or geometry are an :class:`ExportError` naming the problem."""
    path = Path(path).expanduser()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # torch's text advises the unsafe reader: give only the refusal's reason
        text = str(exc)
        reason = text.split("WeightsUnpickler error:", 1)[1].strip().splitlines()[0] \
            if "WeightsUnpickler error:" in text else first_line(exc)
        raise ExportError(f"cannot read {path} as a tensors-only checkpoint ({reason}); checkpoints made elsewhere "
                          "are read only if they hold nothing but tensors") from None
    except Exception as exc:  # noqa: BLE001 - not a torch file, truncated, unreadable
        raise ExportError(f"cannot read {path} as a FlashMemory release checkpoint: {first_line(exc)}") from None
    if isinstance(state, dict) and "model_state" in state and isinstance(state["model_state"], dict):
        state = state["model_state"]  # an epoch file of their trainer
    if not isinstance(state, dict) or not state:
        raise ExportError(f"{path} holds no state dict")
    by_layer: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        match = _KEY.match(str(key))
        if match is None:
            raise ExportError(f"{path}: unexpected key {key!r} (a release joint checkpoint has "
                              "retrievers.l{i}.wq_a.weight, .q_norm_weight, .wq_b.weight, .weights_proj.weight)")
        if match.group(2) != "freqs_cis":
            by_layer.setdefault(int(match.group(1)), {})[match.group(2)] = value
    if not by_layer:
        raise ExportError(f"{path} holds no retriever weights (retrievers.l{{i}}.wq_a.weight, ...)")
    for index, weights in sorted(by_layer.items()):
        missing = sorted(set(_OURS) - set(weights))
        if missing:
            raise ExportError(f"{path}: retrievers.l{index} lacks {', '.join(missing)}")
        for name in ("wq_a.weight", "wq_b.weight", "weights_proj.weight"):
            if not isinstance(weights[name], torch.Tensor) or weights[name].dim() != 2:
                raise ExportError(f"{path}: retrievers.l{index}.{name} is not a matrix")
    first = by_layer[min(by_layer)]
    rank, hidden = first["wq_a.weight"].shape
    if first["wq_b.weight"].shape[0] % RELEASE_HEAD_DIM:
        raise ExportError(f"{path}: wq_b has {first['wq_b.weight'].shape[0]} rows, not a multiple of 128")
    heads = first["wq_b.weight"].shape[0] // RELEASE_HEAD_DIM
    if hidden != backbone_config.hidden_size or backbone_config.index_head_dim != RELEASE_HEAD_DIM:
        raise ExportError(f"{path} is for hidden size {hidden} and 128-dim index keys; this backbone has "
                          f"{backbone_config.hidden_size} and {backbone_config.index_head_dim}")
    try:
        config = release_config(backbone_config, sorted(by_layer), int(rank), int(heads))
    except FmIndexError as exc:
        raise ExportError(f"{path}: {exc}") from None
    indexer = MemoryIndexer(config)
    ours = {}
    for index, layer in zip(sorted(by_layer), config.layers):
        for theirs, mine in _OURS.items():
            ours[f"layers.{layer}.{mine}"] = by_layer[index][theirs].float()
    expected = {name: t.shape for name, t in indexer.state_dict().items()}
    for name, tensor in ours.items():
        if tuple(tensor.shape) != tuple(expected[name]):
            raise ExportError(f"{path}: {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name])} "
                              "(all layers must share one rank and head count)")
    indexer.load_state_dict(ours)
    return indexer.to(device).eval()


def release_state_dict(indexer: MemoryIndexer) -> dict[str, torch.Tensor]:
    """The release's joint-checkpoint state dict of ``indexer`` (fp32, CPU; no RoPE table: their serving code
    builds its own). Needs the layers' CSA indices (``config.csa_indices``) and the release's key geometry."""
    config = indexer.config
    if len(config.csa_indices) != len(config.layers):
        raise ExportError("the memory indexer does not record its layers' CSA indices; re-export it with this "
                          "version of fm-index (they name the release's checkpoint keys)")
    if config.index_head_dim != RELEASE_HEAD_DIM:
        raise ExportError(f"the release's retriever scores 128-dim index keys; this one has {config.index_head_dim}")
    out = {}
    for index, layer in zip(config.csa_indices, config.layers):
        for theirs, mine in _OURS.items():
            out[f"retrievers.l{index}.{theirs}"] = indexer.layer(layer).get_parameter(mine).detach().float().cpu()
    return out


def write_release_checkpoint(indexer: MemoryIndexer, path: str | Path) -> Path:
    """``torch.save`` of :func:`release_state_dict` at ``path``: written under a temporary name, then linked to
    ``path`` only if nothing is there (an existing file is never overwritten)."""
    from .outputs import temp_path

    path = Path(path)
    if path.exists():
        raise ExportError(f"{path} exists; choose another --out")
    state = release_state_dict(indexer)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        torch.save(state, tmp)
        os.link(tmp, path)  # fails if a file appeared at path meanwhile
    except FileExistsError:
        raise ExportError(f"{path} exists; choose another --out") from None
    finally:
        tmp.unlink(missing_ok=True)
    return path

