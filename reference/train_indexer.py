"""Train the Lightning Indexer alone against the dense attention at long context (the backbone frozen).

Why (data/reference/README.md, "Indexer or reading?"): at 64K tokens the default's CSA layer 6 ranks a needle
536-10,846 among the visible entries, where at 32K it had it in its top-64 in 16 of 20 prompts, and more picks bring
single needles back from 0% to 15-30%. The sparse-phase distillation of ``distillation.py`` cannot repair a ranking
like that: its KL is a softmax over the indexer's own top-k picks, so an entry the indexer does not pick gets no
gradient. DeepSeek's
dense warm-up trains the indexer against the main attention over every entry; this is that warm-up at 32K-64K
tokens, on a trained backbone, with everything but the CSA layers' indexers frozen. What it found (the card,
"Indexer alone at long range"): 32K gains, 64K does not; averaged over every query the indexers were already
picking nearly the most mass any k entries hold, but not at the query before the answer, which ``--answer-weight``
weighs up.

One step = one sequence (``train.BatchSampler``: training haystacks, the task mix of ``train.py``):

1. Teacher: a chunked prefill through the model's ``DynamicCache`` with every CSA layer reading every compressed
   entry (``index_topk`` = all) and no gradient. Hooks keep, per CSA layer, the indexer's inputs (the attention
   input x_t, the shared low-rank query, the positions) and p[t, s], the main attention's probability mass on each
   compressed entry summed over heads (``attention.KEEP_MASS``): [S, S/4] in bf16, 2 GiB per layer at 64K.
2. Student, per CSA layer: the indexer's keys K[s] (its own compressor over x, with gradient) and queries q_h(t);
   in query chunks I[t, s] = sum_h w_h(t) ReLU(q_h(t) . K[s]) (transformers' scorer) over every causally visible
   entry, and KL(p[t] / sum_s p[t, s] || softmax_s I[t, s]) averaged over the queries that see an entry, then over
   the layers: the loss of ``distillation.py`` in its dense warm-up, without an [S, heads, S/4] tensor. Each chunk
   is backpropagated at once; its gradients with respect to K and q gather on detached copies and go through the
   compressor and the query projection once per layer.

The language model is untouched: with every entry read the model's outputs do not change; with the native top-k
they change only through what the indexers pick. Logged per layer besides the KL: ``mass@k``, the teacher's mass
on the student's own top ``index_topk`` picks, and ``best@k``, the most any k entries hold (the teacher's own top
k): the student's ceiling, below 1.0 where attention is diffuse.

Checkpoint (``--ckpt``): only what this trains, ``indexer.safetensors`` (the CSA indexers' parameters, fp32, 2 MB
for ``reference``), ``optimizer.pt`` (their AdamW state) and ``state.json``, which names the backbone it started from
(``init``, a path relative to the repository, with the sha256 of its weight files: loading refuses a backbone that
changed since). ``train.load_checkpoint`` reads it as that backbone with these indexers, so ``evaluate_needles
--model``, ``needle_rank --model``, ``export`` and ``--resume`` take it like any checkpoint, and it is small enough
to come back from a device call and travel to the next one. ``--max-minutes`` stops cleanly and saves; ``--resume``
continues the step count, the data and the optimizer where the checkpoint stopped.

Run: ``python -m reference.train_indexer --init data/reference --ckpt reference/work/idx/ckpt --lengths 65536 32768
--max-minutes 5`` (one H200: ``reference/indexer_piece.sh``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4IndexerScorer, apply_rotary_pos_emb

from lsa_runtime.window_attention import KEEP_MASS, ChunkedIndexer, query_chunk, set_attention
from .build_corpus import REFERENCE_DIR, WORK
from .evaluate_needles import _cache_kwarg, chunk_length, set_topk
from .model_config import csa_layer_indices
from .train import BatchSampler, load_checkpoint

INDEXER_FILE = "indexer.safetensors"
EVERY_ENTRY = 1 << 30  # an index_topk above any entry count: the indexers pick every visible entry


# ---------------------------------------------------------------- teacher
class DenseTeacher:
    """Hooks on the CSA layers that record, during a chunked prefill, the indexer's inputs and the main attention's
    head-summed mass on each compressed entry (the layers must read every entry: ``index_topk`` >= S / 4), stored
    as ``mass_dtype`` (bf16: 2 GiB per layer at 64K; its ~0.4% round-off is far below what the KL resolves).
    ``rows``: keep the mass of these query positions only (p is then [len(rows), T], in that order)."""

    def __init__(self, model, csa_layers: list[int], mass_dtype: torch.dtype = torch.bfloat16,
                 rows: list[int] | None = None):
        self.model, self.csa_layers, self.mass_dtype = model, list(csa_layers), mass_dtype
        self.rows = None if rows is None else list(rows)
        self._handles = []
        self.inputs: dict[int, list] = {}
        self.mass: dict[int, torch.Tensor] = {}
        self._rows: dict[int, tuple[int, int]] = {}
        for i in self.csa_layers:
            attn = model.model.layers[i].self_attn
            setattr(attn, KEEP_MASS, True)
            self._handles.append(attn.compressor.indexer.register_forward_pre_hook(self._keep_inputs(i)))
            self._handles.append(attn.register_forward_hook(self._keep_mass(i)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        for i in self.csa_layers:
            setattr(self.model.model.layers[i].self_attn, KEEP_MASS, False)

    @torch.no_grad()
    def run(self, ids: torch.Tensor, chunk: int, max_bytes: int) -> dict[int, tuple]:
        """Prefill ``ids`` [S] in chunks; returns {layer: (x [S, d] fp32, q_residual [S, r] fp32, positions [S],
        p [S, T] in ``mass_dtype``)}."""
        from transformers import DynamicCache

        model, n = self.model, ids.shape[0]
        rate = model.config.compress_rates["compressed_sparse_attention"]
        self.inputs = {i: [] for i in self.csa_layers}
        kept = n if self.rows is None else len(self.rows)
        self.mass = {i: torch.zeros(kept, n // rate, dtype=self.mass_dtype, device=ids.device) for i in self.csa_layers}
        cache, kwarg, start = DynamicCache(config=model.config), _cache_kwarg(model), 0
        while start < n:
            length = min(chunk_length(model.config, start, chunk, max_bytes), n - start)
            with _autocast(ids.device):
                model.model(input_ids=ids[None, start:start + length], use_cache=True, **{kwarg: cache})
            start += length
        out = {}
        for i in self.csa_layers:
            x, q_res, pos = (torch.cat(parts) for parts in zip(*self.inputs[i]))
            out[i] = (x, q_res, pos, self.mass[i])
        self.inputs, self.mass = {}, {}
        return out

    def _keep_inputs(self, i):
        def hook(module, args):
            x, q_res, pos = args[0][0], args[1][0], args[2][0]  # batch of one
            self.inputs[i].append((x.float(), q_res.float(), pos))
            self._rows[i] = (int(pos[0]), int(pos[-1]) + 1)
        return hook

    def _keep_mass(self, i):
        def hook(module, args, output):
            a, b = self._rows.pop(i, (0, 0))
            mass = output[1]
            if mass is None or b <= a:
                return
            mass = mass[0, 0]  # [chunk, entries so far]
            if self.rows is None:
                self.mass[i][a:b, :mass.shape[-1]] = mass.to(self.mass_dtype)
                return
            for j, t in enumerate(self.rows):
                if a <= t < b:
                    self.mass[i][j, :mass.shape[-1]] = mass[t - a].to(self.mass_dtype)
        return hook


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


# ---------------------------------------------------------------- student
def keys_and_queries(indexer, x: torch.Tensor, q_res: torch.Tensor, positions: torch.Tensor):
    """The indexer's compressed keys K[s] [1, T, D] over x [S, d] (its own compressor, as transformers computes them
    in one pass) and its queries q_h(t) [1, S, H, D] from the shared low-rank query q_res [S, r] at ``positions``
    [S] (RoPE), under the model's autocast; with gradient when enabled."""
    seq = x.shape[0]
    x, q_res, pos = x[None], q_res[None], positions[None]
    with _autocast(x.device):
        keys = ChunkedIndexer._compressed_keys(indexer, x, None, None)
        cos, sin = indexer.rotary_emb(x, position_ids=pos, layer_type=indexer.rope_layer_type)
        q = indexer.q_b_proj(q_res).view(1, seq, -1, indexer.head_dim).transpose(1, 2)
        q = apply_rotary_pos_emb(q, cos, sin).transpose(1, 2)
    return keys, q


def indexer_scores(indexer, x: torch.Tensor, q_res: torch.Tensor, positions: torch.Tensor, rows: list[int]):
    """I[t, s] = sum_h w_h(t) ReLU(q_h(t) . K[s]) of the given query rows over every compressed entry: [len(rows),
    T] fp32, from the indexer inputs a DenseTeacher recorded (no gradient)."""
    with torch.no_grad():
        keys, q = keys_and_queries(indexer, x, q_res, positions)
        with _autocast(x.device):
            return DeepseekV4IndexerScorer.forward(indexer.scorer, q[:, rows], keys, x[None, rows])[0].float()


def dense_kl(indexer, x: torch.Tensor, q_res: torch.Tensor, positions: torch.Tensor, target: torch.Tensor,
             topk: int, scale: float = 1.0, backward: bool = True,
             weights: torch.Tensor | None = None) -> tuple[float, float, float]:
    """KL(p || softmax(I)) over every visible entry for one CSA layer's indexer, averaged over the queries that see
    an entry (weighted by ``weights`` [S] when given: sum_t w_t KL_t / sum_t w_t); with ``backward`` its gradient x
    ``scale`` is accumulated in the indexer's parameters (query chunks of at most ``attention.CHUNK_BYTES`` per
    [chunk, heads, T] block). Returns (KL, mass@topk, best@topk): the KL, and the plain mean over those queries of
    the teacher mass on the student's top-``topk`` visible entries and on the teacher's own top ``topk``.

    x [S, d], q_res [S, r]: the indexer's inputs; positions [S]; target p [S, T] (unnormalised mass, any dtype)."""
    seq = x.shape[0]
    keys, q = keys_and_queries(indexer, x, q_res, positions)
    x, pos = x[None], positions[None]
    rate = indexer.compress_rate
    n_entries = keys.shape[1]
    keys_leaf, q_leaf = keys.detach().requires_grad_(backward), q.detach().requires_grad_(backward)
    limit = ((pos[0] + 1) // rate)[:, None]  # [S, 1]: entries s < limit are visible to query t
    entries = torch.arange(n_entries, device=x.device)
    target = target[:, :n_entries]
    step = query_chunk(seq, indexer.num_heads * max(1, n_entries) * 4)
    weights = torch.ones(seq, device=x.device) if weights is None else weights.to(x.device, torch.float32)
    with torch.no_grad():  # the queries that see mass on a visible entry: the means' denominators
        seen = torch.cat([(target[a:a + step].float() * (entries < limit[a:a + step])).sum(-1) > 0
                          for a in range(0, seq, step)])
        n_rows, weight_total = int(seen.sum()), float((seen * weights).sum())
    if n_rows == 0 or n_entries == 0 or weight_total <= 0:
        return 0.0, 1.0, 1.0
    k = min(topk, n_entries)
    kl_total, mass_total, best_total = 0.0, 0.0, 0.0
    for a in range(0, seq, step):
        visible = entries < limit[a:a + step]  # [c, T]
        p = target[a:a + step].float() * visible
        total = p.sum(-1, keepdim=True)
        rows = total[:, 0] > 0
        if not rows.any():
            continue
        p = p / total.clamp_min(1e-30)
        with torch.set_grad_enabled(backward), _autocast(x.device):
            logits = DeepseekV4IndexerScorer.forward(indexer.scorer, q_leaf[:, a:a + step], keys_leaf,
                                                     x[:, a:a + step])[0].float()  # I[t, s]: [c, T]
            # a large finite fill (as distillation.py) keeps rows with no visible entry finite in the backward
            log_q = F.log_softmax(logits.masked_fill(~visible, -1e9), dim=-1)
            log_p = torch.where(p > 0, p.clamp_min(1e-30).log(), torch.zeros_like(p))
            kl = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)
            loss = (kl * rows * weights[a:a + step]).sum() / weight_total
        if backward:
            (loss * scale).backward()
        with torch.no_grad():
            picks = logits.detach().masked_fill(~visible, float("-inf")).topk(k, dim=-1).indices
            mass_total += float((p.gather(-1, picks).sum(-1) * rows).sum())
            best_total += float((p.topk(k, dim=-1).values.sum(-1) * rows).sum())
        kl_total += float(loss.detach())
    if backward:
        torch.autograd.backward([keys, q], [keys_leaf.grad, q_leaf.grad])
    return kl_total, mass_total / n_rows, best_total / n_rows


def indexer_parameters(model, csa_layers: list[int]) -> list[torch.nn.Parameter]:
    """Freeze the model and unfreeze the CSA layers' Lightning Indexers (compressor, W_q, head weights)."""
    model.requires_grad_(False)
    params = []
    for i in csa_layers:
        indexer = model.model.layers[i].self_attn.compressor.indexer
        indexer.requires_grad_(True)
        params += list(indexer.parameters())
    return params


def train_step(model, teacher: DenseTeacher, ids: torch.Tensor, chunk: int, max_bytes: int,
               backward: bool = True, weights: torch.Tensor | None = None) -> dict:
    """Teacher prefill, then every CSA layer's dense KL (gradients accumulate in .grad when ``backward``; ``weights``
    [S]: per-query weights of the KL's mean)."""
    captured = teacher.run(ids, chunk, max_bytes)
    layers = {}
    for i, (x, q_res, pos, target) in captured.items():
        indexer = model.model.layers[i].self_attn.compressor.indexer
        kl, mass, best = dense_kl(indexer, x, q_res, pos, target, model.config.index_topk, 1.0 / len(captured),
                                  backward, weights)
        layers[str(i)] = {"kl": kl, "mass_at_k": mass, "best_at_k": best}
    return {key: float(np.mean([v[key] for v in layers.values()])) for key in ("kl", "mass_at_k", "best_at_k")} | {
        "layers": layers}


# ---------------------------------------------------------------- checkpoint
def weights_digest(folder: Path) -> str:
    """sha256 over a model folder's or checkpoint's weight files (model.safetensors, weights-*.safetensors or, for
    this module's checkpoints, indexer.safetensors and its backbone's digest), in name order."""
    folder = Path(folder)
    if (folder / INDEXER_FILE).is_file():
        state = json.loads((folder / "state.json").read_text())
        files, prefix = [folder / INDEXER_FILE], state["init_sha256"].encode()
    else:
        files, prefix = sorted(folder.glob("model*.safetensors")) + sorted(folder.glob("weights-*.safetensors")), b""
    if not files:
        raise SystemExit(f"{folder}: no weight files")
    digest = hashlib.sha256(prefix)
    for f in files:
        digest.update(f.read_bytes())
    return digest.hexdigest()


def save_indexer_checkpoint(model, optimizer, ckpt: Path, state: dict) -> None:
    """Write the trained parameters (those with ``requires_grad``), the optimizer and ``state`` to ``ckpt`` (through a
    temporary folder, so an interrupted save leaves the previous checkpoint)."""
    from safetensors.torch import save_file

    tmp = ckpt.with_name(ckpt.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad},
              tmp / INDEXER_FILE)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    shutil.rmtree(ckpt, ignore_errors=True)
    tmp.rename(ckpt)


def load_indexer_checkpoint(ckpt: Path, state: dict):
    """(model, state): the backbone ``state["init"]`` with the checkpoint's indexer parameters."""
    from safetensors.torch import load_file

    init = Path(state["init"])
    if not init.is_dir():
        raise SystemExit(f"{ckpt}: its backbone {init} is missing (paths are relative to the repository root)")
    if weights_digest(init) != state["init_sha256"]:
        raise SystemExit(f"{ckpt}: its backbone {init} changed since this indexer was trained (sha256)")
    model, _ = load_checkpoint(init)
    weights = load_file(ckpt / INDEXER_FILE)
    params = dict(model.named_parameters())
    foreign = [n for n in weights if n not in params or ".compressor.indexer." not in n]
    if foreign or not weights:
        raise SystemExit(f"{ckpt}: {INDEXER_FILE} holds no indexer parameters or others, e.g. {foreign[:2]}")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    model.config.max_position_embeddings = max(model.config.max_position_embeddings,
                                               state["config"]["max_position_embeddings"])
    return model, state


# ---------------------------------------------------------------- main
def lr_at(step: int, minutes: float, args) -> float:
    """Linear warm-up over ``--warmup`` steps, then constant; linear decay to 10% over the last ``--decay-minutes``
    of ``--max-minutes``."""
    lr = args.lr * min(1.0, (step + 1) / max(1, args.warmup))
    if args.max_minutes and args.decay_minutes:
        left = args.max_minutes - minutes
        if left < args.decay_minutes:
            lr *= 0.1 + 0.9 * max(0.0, left) / args.decay_minutes
    return lr


def main(argv=None):
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="checkpoint folder (written; read by --resume)")
    parser.add_argument("--init", type=Path, default=REFERENCE_DIR,
                        help="the backbone to start from: a model folder or a train.py checkpoint")
    parser.add_argument("--resume", action="store_true", help="continue from --ckpt (step, data, optimizer)")
    parser.add_argument("--corpus", type=Path, default=WORK / "corpus.npz")
    parser.add_argument("--tokenizer", type=Path, default=REFERENCE_DIR)
    parser.add_argument("--lengths", type=int, nargs="+", default=[65536, 32768],
                        help="sequence lengths, one sequence a step, in turn")
    parser.add_argument("--steps", type=int, default=10_000, help="stop (and save) at this step")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop cleanly after this wall time")
    parser.add_argument("--decay-minutes", type=float, default=None,
                        help="decay the lr linearly to 10%% over the last minutes of --max-minutes")
    parser.add_argument("--code-frac", type=float, default=0.3, help="share of plain code sequences (train.py)")
    parser.add_argument("--answer-weight", type=float, default=0.0,
                        help="extra weight of the queries that predict an answer token (the retrieving ones) in the "
                             "KL's mean: w_t = 1 + this (0: every query alike)")
    parser.add_argument("--seed", type=int, default=11, help="data seed (train.py used 0 and others)")
    parser.add_argument("--chunk", type=int, default=4096, help="largest prefill chunk of the teacher (tokens)")
    parser.add_argument("--chunk-gib", type=float, default=8.0,
                        help="halve a prefill chunk while its fp32 score block exceeds this")
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    args = parser.parse_args(argv)
    if args.resume and not (args.ckpt / "state.json").is_file():
        parser.error(f"--resume: no checkpoint in {args.ckpt}")
    if not args.resume and not args.init.is_dir():
        parser.error(f"--init {args.init} is not a folder (a model folder or a train.py checkpoint)")
    if not args.corpus.is_file():
        parser.error(f"--corpus {args.corpus} does not exist (python -m reference.build_corpus makes it)")
    if min(args.lengths) < 2:
        parser.error("--lengths: sequences of at least 2 tokens")
    if args.answer_weight < 0:
        parser.error("--answer-weight: 0 or more")
    t_start = time.time()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.backends.cuda.matmul.allow_tf32 = True
    source = args.ckpt if args.resume else args.init
    model, state = load_checkpoint(source)
    init = Path(state["init"]) if args.resume else args.init
    init_sha = state["init_sha256"] if args.resume else weights_digest(args.init)
    config = model.config
    if config.max_position_embeddings < max(args.lengths):
        config.max_position_embeddings = max(args.lengths) + 256  # plain RoPE: only the declared range
    start = state["step"] if args.resume else 0
    log = state.get("log", []) if args.resume else []
    set_attention(model, "window")
    model.to(device).eval()  # no dropout; the backbone is frozen
    csa = csa_layer_indices(config)
    topk = config.index_topk
    params = indexer_parameters(model, csa)
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    if args.resume and (args.ckpt / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(args.ckpt / "optimizer.pt", map_location=device, weights_only=True))
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    sampler = BatchSampler(tokenizer, np.load(args.corpus)["train"], args.code_frac, args.seed)
    teacher = DenseTeacher(model, csa)
    print(f"{sum(p.numel() for p in params)} indexer parameters trained (CSA layers {csa}), device {device}, "
          f"from {source} at step {start}", flush=True)

    def save(step):
        set_topk(model, topk)
        saved = {"step": step, "init": str(init), "init_sha256": init_sha, "config": config.to_dict(), "log": log,
                 "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                 "parameters": state.get("parameters", sum(p.numel() for p in model.parameters())),
                 "trained": "Lightning Indexers of the CSA layers only (reference/train_indexer.py)"}
        save_indexer_checkpoint(model, optimizer, args.ckpt, saved)

    step = start
    while step < args.steps:
        minutes = (time.time() - t_start) / 60
        if args.max_minutes and minutes > args.max_minutes:
            print(f"time budget reached at step {step}")
            break
        length = args.lengths[step % len(args.lengths)]
        ids, answer, task = sampler.sequence(step, 0, length)
        weights = None
        if args.answer_weight:  # answer[i]: target i + 1 is an answer token, predicted by query i
            weights = torch.ones(length, device=device)
            weights[:-1] += args.answer_weight * torch.as_tensor(answer, device=device, dtype=torch.float32)
        lr = lr_at(step, minutes, args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        set_topk(model, EVERY_ENTRY)
        metrics = train_step(model, teacher, torch.as_tensor(ids, device=device), args.chunk,
                             int(args.chunk_gib * 2**30), weights=weights)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        row = {"step": step, "seq_len": length, "task": task, "lr": round(lr, 6), "kl": round(metrics["kl"], 4),
               "mass_at_k": round(metrics["mass_at_k"], 4),
               "best_at_k": round(metrics["best_at_k"], 4), "grad_norm": round(grad_norm, 3),
               "minutes": round((time.time() - t_start) / 60, 2),
               "layers": {i: {k: round(v, 4) for k, v in m.items()} for i, m in metrics["layers"].items()}}
        if device.type == "cuda":
            row["mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
        log.append(row)
        if step % args.log_every == 0 or step == start + 1:
            print(json.dumps(row), flush=True)
    teacher.remove()
    save(step)
    print(f"saved {args.ckpt} at step {step} ({(time.time() - t_start) / 60:.1f} min)")
    return model, step


if __name__ == "__main__":
    main()
