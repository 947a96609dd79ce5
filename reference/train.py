"""Train the reference DeepSeek-V4 from scratch: language modelling + Lightning-Indexer distillation.

Data per sequence (seeded by (seed, step), so a resumed run sees exactly the data it would have seen): with
probability ``--code-frac`` a window of the stdlib token stream, otherwise a synthetic retrieval task from
``tasks.py`` (single needle, multi-key, multi-value, multi-query, variable tracking; ``--mix``) on a stdlib or
noise haystack.
Loss = next-token cross-entropy over all tokens + ``--answer-weight`` x cross-entropy over the answer tokens
+ ``--kl-weight`` x the indexer distillation KL (``distillation.py``) averaged over the CSA layers.

Schedule (DeepSeek's indexer recipe in miniature): steps < ``--dense-steps`` are the dense warm-up at
``--dense-seq-len`` with ``index_topk`` = every compressed entry; later steps are sparse at ``--seq-len`` with
the config's ``index_topk``. ``--stages`` replaces that pair by a length curriculum (e.g. short sequences
first, where needles sit inside the sliding window, so copying can form before it must go through compressed
entries). LR: linear warm-up, constant, linear decay to 10% over the last ``--decay-steps``.

Checkpoints (``--ckpt DIR``): ``weights-*.safetensors`` shards of at most 15 MB (``--ckpt-dtype``), optional
``optimizer.pt``, ``state.json`` (step, config, arguments, log). ``--resume`` continues from it; without a saved
optimizer the Adam moments restart (with a short re-warm-up). ``--max-minutes`` stops cleanly and saves;
``--decay-minutes`` decays the lr linearly to 10% over the last minutes of that budget.

Long sequences (16K-64K tokens): ``--attention window`` (the default) computes the model's exact attention
without the dense [S, S + S/4] score matrix and runs the Lightning Indexer in query chunks, its scores I[t, s]
kept with gradient only at the top-k picks, which is all the distillation KL reads (``attention.py``,
``distillation.py``); ``--checkpointing`` recomputes each decoder layer in the backward pass (activation
checkpointing). Memory then grows about linearly with the sequence length: the only [S, S/4]-sized tensors left
are one CSA layer's block bias and attention mass at a time, and one 64K sequence fits a micro-batch.
``--max-positions`` raises ``max_position_embeddings`` of a warm-started model (plain RoPE: nothing else
changes), so evaluation prompts of 64K tokens and more are within the config's range.

Run: ``python -m reference.train --ckpt reference/work/ckpt --steps 2000 ...``
(the exact commands used for the bundled model are in ``data/reference/README.md``).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lsa_runtime.window_attention import set_attention
from .build_corpus import REFERENCE_DIR, WORK
from .distillation import IndexerDistillation
from .model_config import MAX_POSITIONS, csa_layer_indices, reference_config, toy_config
from .tasks import TaskBuilder

SHARD_BYTES = 15 * 1024 * 1024


# ---------------------------------------------------------------- data
class BatchSampler:
    """Deterministic batches: sequence j of step i is drawn from ``default_rng([seed, step, j])``."""

    MIX = (("niah_single", 0.4), ("niah_multikey", 0.2), ("niah_multivalue", 0.2), ("vt", 0.2))

    def __init__(self, tokenizer, train_tokens: np.ndarray, code_frac: float, seed: int, mix=None,
                 multikey_keys: tuple[int, int] = (4, 4), needle_distance: tuple[int, int, int] | None = None,
                 origin: int = 0):
        self.tokens = train_tokens
        self.needle_distance = needle_distance  # (START, END, STEPS): --needle-distance
        self.origin = origin  # the run's first step: the curriculum counts from it
        self.multikey_keys = multikey_keys
        self.mix = tuple(mix) if mix else self.MIX
        self.builder = TaskBuilder(tokenizer, train_tokens, tokenizer.bos_token_id)
        self.bos = tokenizer.bos_token_id
        self.code_frac = code_frac
        self.seed = seed

    def max_distance(self, step: int) -> int | None:
        """The farthest a needle may sit from the question at ``step``: ``--needle-distance START:END:STEPS`` grows it
        linearly from START to END tokens over the run's first STEPS steps (counted from ``origin``)."""
        if self.needle_distance is None:
            return None
        start, end, steps = self.needle_distance
        return int(round(start + (end - start) * min(1.0, max(0, step - self.origin) / steps)))

    def sequence(self, step: int, j: int, length: int) -> tuple[np.ndarray, np.ndarray, str]:
        """(input_ids [length], answer_mask over targets [length - 1], task name or "code")."""
        rng = np.random.default_rng([self.seed, step, j])
        distance = self.max_distance(step)
        answer = np.zeros(length - 1, dtype=bool)
        if rng.random() < self.code_frac:
            start = int(rng.integers(0, len(self.tokens) - length))
            ids = np.concatenate([[self.bos], self.tokens[start:start + length - 1]]).astype(np.int64)
            return ids, answer, "code"
        tasks, probs = zip(*self.mix)
        task = tasks[rng.choice(len(tasks), p=np.asarray(probs) / sum(probs))]
        # 4 uuids (~100 tokens) are not a useful target: multi-value and multi-query answers are numbers
        kind = "number" if task in ("niah_multivalue", "niah_multiquery") else None
        n_multi = None
        if task == "niah_multikey" and self.multikey_keys != (4, 4):  # numbers: uuid needles crowd short stages
            n_multi, kind = int(rng.integers(self.multikey_keys[0], self.multikey_keys[1] + 1)), "number"
        sample = None
        for n in (range(n_multi, 1, -1) if n_multi else [None]):  # as many keys as the stage holds
            try:
                sample = self.builder.build(rng, task, length, kind=kind, n_multi=n, max_distance=distance)
                break
            except ValueError:  # too many needles for a short curriculum stage
                pass
        if sample is None:  # a multi-needle task does not fit a short curriculum stage: one needle instead
            sample = self.builder.build(rng, "niah_single", length, kind=kind, max_distance=distance)
        answer[sample.answer_start - 1:sample.answer_start - 1 + sample.answer_len] = True
        return sample.input_ids, answer, sample.task

    def batch(self, step: int, batch_size: int, length: int):
        """(ids [batch, length], answer masks [batch, length - 1], task of each row)."""
        seqs = [self.sequence(step, j, length) for j in range(batch_size)]
        return (torch.as_tensor(np.stack([s[0] for s in seqs])), torch.as_tensor(np.stack([s[1] for s in seqs])),
                [s[2] for s in seqs])


# ---------------------------------------------------------------- model and checkpoints
def new_model(config, seed: int):
    from transformers import DeepseekV4ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(config)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        # Hash-routed MoE layers look experts up in a fixed token -> experts table (tid2eid); the default is all
        # zeros (every token to expert 0), so draw distinct experts per token once, as a real checkpoint has.
        for name, buf in model.named_buffers():
            if name.endswith("tid2eid"):
                k = buf.shape[1]
                rows = torch.stack([torch.randperm(config.num_local_experts, generator=gen)[:k]
                                    for _ in range(buf.shape[0])])
                buf.copy_(rows)
    return model


def save_checkpoint(model, optimizer, ckpt: Path, state: dict, dtype: torch.dtype, with_optimizer: bool) -> None:
    from safetensors.torch import save_file

    tmp = ckpt.with_name(ckpt.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    for old in tmp.iterdir():
        old.unlink()
    shard, size, index = {}, 0, 0
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu")
        t = t.to(dtype) if t.is_floating_point() else t
        if size + t.numel() * t.element_size() > SHARD_BYTES and shard:
            save_file(shard, tmp / f"weights-{index}.safetensors")
            shard, size, index = {}, 0, index + 1
        shard[name] = t.contiguous()
        size += t.numel() * t.element_size()
    save_file(shard, tmp / f"weights-{index}.safetensors")
    if with_optimizer:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1) + "\n")
    if ckpt.exists():
        for old in ckpt.iterdir():
            old.unlink()
        ckpt.rmdir()
    tmp.rename(ckpt)


def load_checkpoint(ckpt: Path):
    from safetensors.torch import load_file
    from transformers import DeepseekV4Config

    if (ckpt / "state.json").is_file():
        state = json.loads((ckpt / "state.json").read_text())
        if "init" in state:  # train_indexer.py's checkpoint: its backbone plus the trained indexers
            from .train_indexer import load_indexer_checkpoint

            return load_indexer_checkpoint(ckpt, state)
        files = sorted(ckpt.glob("weights-*.safetensors"))
    elif (ckpt / "model.safetensors").is_file():  # an exported model folder such as data/reference
        from transformers import DeepseekV4ForCausalLM

        # save_pretrained wrote the official checkpoint names: let transformers map them back
        model = DeepseekV4ForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        meta = json.loads((ckpt / "fm_index.json").read_text()) if (ckpt / "fm_index.json").is_file() else {}
        return model, {"step": int(meta.get("step", 0)), "config": model.config.to_dict(), "args": {"seed": 0},
                       "log": []}
    else:
        raise SystemExit(f"{ckpt} is neither a training checkpoint (state.json) nor a model folder")
    config = DeepseekV4Config(**state["config"])
    model = new_model(config, state["args"]["seed"])
    weights = {}
    for f in files:
        weights.update(load_file(f))
    params = model.state_dict()
    missing = set(params) - set(weights)
    if missing:
        raise SystemExit(f"checkpoint {ckpt} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
    model.load_state_dict({k: v.to(params[k].dtype) for k, v in weights.items()})
    return model, state


# ---------------------------------------------------------------- training
def lr_at(step: int, args, minutes: float | None = None) -> float:
    """Learning rate of ``step``; ``minutes`` (elapsed wall time) drives ``--decay-minutes``."""
    if step < args.warmup:
        scale = (step + 1) / args.warmup
    elif args.resumed_at and step < args.resumed_at + args.rewarmup:
        scale = (step - args.resumed_at + 1) / args.rewarmup
    else:
        scale = 1.0
    decay_start = args.steps - args.decay_steps
    if step >= decay_start:
        scale *= 1.0 - 0.9 * (step - decay_start) / max(1, args.decay_steps)
    decay_minutes = getattr(args, "decay_minutes", None)
    if decay_minutes and args.max_minutes and minutes is not None:
        begin = args.max_minutes - decay_minutes
        if minutes > begin:
            scale *= 1.0 - 0.9 * min(1.0, (minutes - begin) / decay_minutes)
    return args.lr * scale


def parse_mix(text: str | None):
    """``"niah_single=0.5,vt=0.5"`` -> ((task, weight), ...); None keeps ``BatchSampler.MIX``."""
    if not text:
        return None
    mix = []
    for part in text.split(","):
        name, _, weight = part.partition("=")
        if name not in TaskBuilder.TASKS:
            raise SystemExit(f"bad --mix task '{name}': one of {', '.join(TaskBuilder.TASKS)}")
        try:
            mix.append((name, float(weight)))
        except ValueError:
            raise SystemExit(f"bad --mix weight in '{part}': use TASK=WEIGHT") from None
    return tuple(mix)


def parse_keys(text: str) -> tuple[int, int]:
    """``"4"`` -> (4, 4); ``"2-8"`` -> (2, 8)."""
    try:
        lo, _, hi = text.partition("-")
        lo, hi = int(lo), int(hi or lo)
    except ValueError:
        raise SystemExit(f"bad --multikey-keys '{text}': use N or LO-HI") from None
    if not 2 <= lo <= hi:
        raise SystemExit(f"bad --multikey-keys '{text}': need 2 <= LO <= HI")
    return lo, hi


def parse_distance(text: str | None) -> tuple[int, int, int] | None:
    """``"4096:65536:150"`` -> (4096, 65536, 150); None -> None."""
    if text is None:
        return None
    try:
        start, end, steps = (int(x) for x in text.split(":"))
    except ValueError:
        raise SystemExit(f"bad --needle-distance '{text}': use START:END:STEPS (tokens, tokens, steps)") from None
    if not (0 < start <= end and steps > 0):
        raise SystemExit(f"bad --needle-distance '{text}': need 0 < START <= END and STEPS > 0")
    return start, end, steps


def parse_stages(text: str) -> list[tuple[tuple[int, ...], int, str]]:
    """``"512:300:all,1024:300:all,4096:0:64"`` -> [(lengths, steps, topk)]; the last stage runs to the end.

    A stage's LENGTH may be several lengths joined by ``/`` (``"32768/8192:0:64"``): its steps cycle through
    them, one length per step, so long sequences are trained without leaving the short ones."""
    stages = []
    for part in text.split(","):
        try:
            length, steps, topk = part.split(":")
            lengths = tuple(int(x) for x in length.split("/"))
            stages.append((lengths, int(steps), topk if topk == "all" else str(int(topk))))
        except ValueError:
            raise SystemExit(f"bad --stages item '{part}': use LENGTH[/LENGTH...]:STEPS:TOPK (TOPK a number or "
                             f"'all')") from None
    return stages


def phase_at(step: int, args, config) -> tuple[int, int]:
    """(sequence length, index_topk) of a step: dense warm-up, then native sparse top-k (or ``--stages``)."""
    rate = config.compress_rates["compressed_sparse_attention"]
    if args.stages:
        begin = 0
        stages = parse_stages(args.stages)
        for i, (lengths, steps, topk) in enumerate(stages):
            if step < begin + steps or i == len(stages) - 1:
                length = lengths[(step - begin) % len(lengths)]
                return length, length // rate if topk == "all" else int(topk)
            begin += steps
    if step < args.dense_steps:
        return args.dense_seq_len, args.dense_seq_len // config.compress_rates["compressed_sparse_attention"]
    return args.seq_len, config.index_topk


def enable_checkpointing(model) -> None:
    """Activation checkpointing of every decoder layer (non-reentrant), in transformers 5.17 and later."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def train_step(model, distill, ids, answer, kl_weight, answer_weight, micro: int, multikey=None):
    """Forward/backward over micro-batches; returns averaged metrics (gradients accumulate in .grad).

    ``multikey`` (bool per row) also reports ``multikey_acc``: answer exact match over those rows only."""
    device = next(model.parameters()).device
    metrics = {"lm": 0.0, "answer": 0.0, "kl": 0.0, "answer_acc": 0.0}
    mk_hits, mk_rows = 0, 0
    n_micro = math.ceil(ids.shape[0] / micro)
    kl_layers: dict[int, float] = {}
    for m in range(n_micro):
        x = ids[m * micro:(m + 1) * micro].to(device, non_blocking=True)
        a = answer[m * micro:(m + 1) * micro].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(input_ids=x, use_cache=False).logits
        logits = logits[:, :-1].float()
        targets = x[:, 1:]
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
        ce = ce.view_as(targets)
        lm = ce.mean()
        n_answer = a.sum()
        answer_ce = (ce * a).sum() / n_answer.clamp_min(1)
        kl, per_layer = distill.pop_loss()
        loss = lm + answer_weight * answer_ce + (kl_weight * kl if kl is not None else 0.0)
        (loss / n_micro).backward()
        with torch.no_grad():
            hit = (logits.argmax(-1) == targets) | ~a
            seq_has = a.any(-1)
            acc = (hit.all(-1) & seq_has).sum() / seq_has.sum().clamp_min(1)
            if multikey is not None:
                mk = multikey[m * micro:(m + 1) * micro].to(device)
                mk_hits += int((hit.all(-1) & mk).sum())
                mk_rows += int(mk.sum())
        metrics["lm"] += float(lm.detach()) / n_micro
        metrics["answer"] += float(answer_ce.detach()) / n_micro
        metrics["kl"] += (float(kl.detach()) if kl is not None else 0.0) / n_micro
        metrics["answer_acc"] += float(acc) / n_micro
        for k, v in per_layer.items():
            kl_layers[k] = kl_layers.get(k, 0.0) + v / n_micro
        del logits, ce, loss
    metrics["kl_layers"] = {str(k): round(v, 4) for k, v in kl_layers.items()}
    if mk_rows:
        metrics["multikey_acc"] = mk_hits / mk_rows
    return metrics


def main(argv=None):
    from transformers import AutoTokenizer

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="checkpoint folder (written, and read by --resume)")
    parser.add_argument("--resume", action="store_true", help="continue from --ckpt (or --init) instead of scratch")
    parser.add_argument("--init", type=Path, default=None, help="resume from this checkpoint, save to --ckpt")
    parser.add_argument("--reset-step", action="store_true",
                        help="with --resume: take only the weights; step, schedule and log start again at 0")
    parser.add_argument("--corpus", type=Path, default=WORK / "corpus.npz")
    parser.add_argument("--tokenizer", type=Path, default=REFERENCE_DIR)
    parser.add_argument("--toy", action="store_true", help="tiny config for CPU smoke tests")
    parser.add_argument("--steps", type=int, default=2000, help="total optimizer steps of the whole schedule")
    parser.add_argument("--stop-at", type=int, default=None, help="stop (and save) at this step")
    parser.add_argument("--dense-steps", type=int, default=600)
    parser.add_argument("--dense-minutes", type=float, default=None,
                        help="end the dense warm-up after this wall time even before --dense-steps (the step "
                             "reached is logged and saved as dense_steps)")
    parser.add_argument("--dense-seq-len", type=int, default=2048)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--stages", default=None,
                        help="length curriculum replacing the dense/sparse pair: LENGTH:STEPS:TOPK,... (TOPK 'all' = "
                             "dense); the last stage runs to the end, e.g. 512:300:all,2048:300:all,4096:0:64")
    parser.add_argument("--batch-tokens", type=int, default=16384, help="tokens per optimizer step")
    parser.add_argument("--micro-tokens", type=int, default=16384, help="tokens per forward (halved on OOM)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--rewarmup", type=int, default=30, help="warm-up after resuming without optimizer state")
    parser.add_argument("--decay-steps", type=int, default=400)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--code-frac", type=float, default=0.3)
    parser.add_argument("--mix", default=None,
                        help="task mixture of the synthetic sequences, TASK=WEIGHT,... (default: "
                             "niah_single=0.4,niah_multikey=0.2,niah_multivalue=0.2,vt=0.2; niah_multiquery "
                             "is available too)")
    parser.add_argument("--multikey-keys", default="4",
                        help="keys per multi-key training sequence: N, or LO-HI drawn uniformly (fewer when a short "
                             "stage cannot hold them); evaluation always uses 4")
    parser.add_argument("--needle-distance", default=None, metavar="START:END:STEPS",
                        help="curriculum: needles within START tokens before the question, the bound growing "
                             "linearly to END over STEPS steps of this run (default: anywhere in the haystack)")
    parser.add_argument("--answer-weight", type=float, default=1.0)
    parser.add_argument("--kl-weight", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-minutes", type=float, default=None, help="stop cleanly after this wall time")
    parser.add_argument("--decay-minutes", type=float, default=None,
                        help="with --max-minutes: decay the lr linearly to 10%% over these last minutes")
    parser.add_argument("--attention", choices=["window", "eager"], default="window",
                        help="window: exact attention without the dense score matrix (attention.py); eager: "
                             "transformers' dense path (the numerical reference; the card says which runs used it)")
    parser.add_argument("--checkpointing", action="store_true",
                        help="activation checkpointing per decoder layer (long sequences: 16K tokens and more)")
    parser.add_argument("--max-positions", type=int, default=MAX_POSITIONS,
                        help="raise the config's max_position_embeddings to at least this")
    parser.add_argument("--save-every", type=int, default=0)
    parser.add_argument("--ckpt-dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--no-optimizer-state", action="store_true", help="leave optimizer.pt out of the checkpoint")
    parser.add_argument("--log-every", type=int, default=10)
    args = parser.parse_args(argv)
    t_start = time.time()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    corpus = np.load(args.corpus)
    train_tokens = corpus["train"]
    source = args.init or args.ckpt
    log_history = []
    args.resumed_at = 0
    if args.resume:
        model, state = load_checkpoint(source)
        start = 0 if args.reset_step else state["step"]
        log_history = [] if args.reset_step else state.get("log", [])
        print(f"resumed from {source} at step {state['step']}" + (" (weights only, schedule from step 0)"
                                                                   if args.reset_step else ""))
    else:
        config = (toy_config if args.toy else reference_config)(len(tokenizer))
        model, start = new_model(config, args.seed), 0
    config = model.config
    if config.max_position_embeddings < args.max_positions:
        config.max_position_embeddings = args.max_positions
    set_attention(model, args.attention)
    if args.checkpointing:
        enable_checkpointing(model)
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params / 1e6:.2f}M parameters, CSA layers {csa_layer_indices(config)}, device {device}, "
          f"attention {args.attention}, checkpointing {args.checkpointing}", flush=True)
    distill = IndexerDistillation(model, csa_layer_indices(config))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    if args.resume and (source / "optimizer.pt").is_file():
        optimizer.load_state_dict(torch.load(source / "optimizer.pt", map_location=device))
    elif args.resume:
        args.resumed_at = start
    sampler = BatchSampler(tokenizer, train_tokens, args.code_frac, args.seed, parse_mix(args.mix),
                           parse_keys(args.multikey_keys), parse_distance(args.needle_distance), origin=start)
    stop_at = min(args.stop_at or args.steps, args.steps)
    micro_tokens = args.micro_tokens
    state = {}

    def save(step):
        nonlocal state
        state = {"step": step, "config": config.to_dict(), "args": {k: (str(v) if isinstance(v, Path) else v)
                                                                     for k, v in vars(args).items()},
                 "log": log_history, "parameters": n_params}
        save_checkpoint(model, optimizer, args.ckpt, state,
                        torch.float32 if args.ckpt_dtype == "float32" else torch.bfloat16,
                        not args.no_optimizer_state)

    step, window_tokens, window_t, last_len = start, 0, time.time(), None
    while step < stop_at:
        if args.max_minutes and (time.time() - t_start) / 60 > args.max_minutes:
            print(f"time budget reached at step {step}")
            break
        if args.dense_minutes and step < args.dense_steps and (time.time() - t_start) / 60 > args.dense_minutes:
            print(f"dense warm-up ends at step {step} (--dense-minutes)")
            args.dense_steps = step
        seq_len, topk = phase_at(step, args, config)
        if seq_len != last_len and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()  # mem_gb is the peak of the current length
        last_len = seq_len
        distill.set_topk(model, topk)
        batch = max(1, args.batch_tokens // seq_len)
        ids, answer, tasks = sampler.batch(step, batch, seq_len)
        multikey = torch.tensor([t == "niah_multikey" for t in tasks])
        lr = lr_at(step, args, (time.time() - t_start) / 60)
        for group in optimizer.param_groups:
            group["lr"] = lr
        while True:
            try:
                metrics = train_step(model, distill, ids, answer, args.kl_weight, args.answer_weight,
                                     max(1, micro_tokens // seq_len), multikey)
                break
            except torch.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                distill.losses = {}
                torch.cuda.empty_cache()
                if micro_tokens // seq_len <= 1:
                    print(f"out of memory with one {seq_len}-token sequence per micro-batch: saving step {step}, "
                          "stopping", flush=True)
                    save(step)
                    raise SystemExit(3)
                micro_tokens //= 2
                print(f"out of memory: micro-batch now {micro_tokens} tokens")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_tokens += ids.numel()
        if step % args.log_every == 0 or step == stop_at:
            if device.type == "cuda":
                torch.cuda.synchronize()
            tps = window_tokens / (time.time() - window_t)
            window_tokens, window_t = 0, time.time()
            row = {"step": step, "seq_len": seq_len, "topk": topk, "lr": round(lr, 6), "lm": round(metrics["lm"], 4),
                   "answer_ce": round(metrics["answer"], 4), "answer_acc": round(metrics["answer_acc"], 3),
                   "kl": round(metrics["kl"], 4), "grad_norm": round(grad_norm, 3), "tok_s": round(tps),
                   "minutes": round((time.time() - t_start) / 60, 2)}
            if "multikey_acc" in metrics:
                row["multikey_acc"] = round(metrics["multikey_acc"], 3)
            if device.type == "cuda":
                row["mem_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 1)
            if step % (args.log_every * 10) == 0:
                row["kl_layers"] = metrics["kl_layers"]
            log_history.append(row)
            print(json.dumps(row), flush=True)
        if args.save_every and step % args.save_every == 0:
            save(step)
    save(step)
    print(f"saved {args.ckpt} at step {step} ({(time.time() - t_start) / 60:.1f} min)")
    distill.remove()
    return model, tokenizer, step


if __name__ == "__main__":
    main()
