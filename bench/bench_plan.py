"""`fm-index plan`'s predictions against what the device really allocates (Flash-shaped model, one GPU).

Weights: ``memory_plan.count_weights`` vs ``torch.cuda.memory_allocated`` after the Flash-shaped model (V4-Flash's
attention and KV dimensions, shrunk MoE, random bf16; ``bench/flash_model.py``) is built with the dtypes transformers
gives a loaded checkpoint (norms, mHC and sinks fp32). Per sequence: ``memory_plan.sequence_state`` vs the device
memory a Session's decoding state holds after ``--context`` tokens (prompt + ``--new-tokens``), measured as the
growth of ``torch.cuda.memory_allocated`` over the model's, in full and LSA mode (a random memory indexer: its
selection is arbitrary, so the plan is given the resident fraction the run selected). Decode and tower CUDA graphs
are off so that no graph pool is counted; a short warm-up per mode runs first, so one-time allocations are not. Also printed: ``Session.stats.device_bytes`` (the runtime's own count).

    python bench/bench_plan.py --contexts 16384,32768 --json out.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.flash_model import build_flash_model  # noqa: E402
from lsa_runtime.backbone import default_memory_layers, fix_fp32_norms, match_unquantized_dtypes  # noqa: E402
from lsa_runtime.memory_indexer import MemoryIndexer, MemoryIndexerConfig  # noqa: E402
from lsa_runtime.memory_plan import LSASettings, count_weights, sequence_state  # noqa: E402
from lsa_runtime.session import Session, SessionConfig  # noqa: E402


def allocated() -> int:
    torch.cuda.synchronize()
    gc.collect()
    return torch.cuda.memory_allocated()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="16384,32768", help="tokens per sequence (prompt + new tokens)")
    parser.add_argument("--new-tokens", type=int, default=70, help="decode steps after the prompt (>= tau + 1)")
    parser.add_argument("--json", default=None, help="write the rows here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_plan measures device allocations: it needs a CUDA device")
    device = torch.device("cuda")

    base = allocated()
    model = build_flash_model(device="cuda", dtype=torch.bfloat16)
    cast = match_unquantized_dtypes(model, torch.bfloat16)  # the dtypes of a loaded checkpoint (fp32 norms, mHC)
    fix_fp32_norms(model)  # as load_backbone: fp32 norm weights, one cast back to the activations' dtype
    weights_measured = allocated() - base
    config = model.config
    weights_plan = count_weights(config).bytes
    rows = [{"what": "weights", "mode": "-", "context": 0, "plan": weights_plan, "measured": weights_measured,
             "runtime_count": None, "note": f"{cast} tensors cast to the loaded dtypes"}]

    layers = default_memory_layers(config)
    mcfg = MemoryIndexerConfig.from_backbone_config(config, layers, rank=2048, tau=64)
    indexer = MemoryIndexer(mcfg).to(device=device, dtype=torch.bfloat16)
    indexer.cuda_graphs = False
    gen = torch.Generator().manual_seed(0)
    # one-time allocations (kernel workspaces, lazily built buffers) belong to no sequence: a short warm-up per mode
    # (1,024 prompt tokens and tau + 1 steps: a chunked prefill, decode steps that emit entries, one trigger)
    warm = torch.randint(3, config.vocab_size, (1024,), generator=gen).tolist()
    for mode in ("full", "lsa"):
        warm_config = SessionConfig(mode=mode, decode_graphs=False, static_decode=False, chunk_size=1024)
        Session(model, None, warm_config, indexer=indexer if mode == "lsa" else None).generate(
            warm, max_new_tokens=mcfg.tau + 1, stop_at_eos=False)
    gc.collect()
    torch.cuda.empty_cache()
    for context in (int(c) for c in args.contexts.split(",")):
        prompt = torch.randint(3, config.vocab_size, (context - args.new_tokens,), generator=gen).tolist()
        for mode in ("full", "lsa"):
            before = allocated()
            # the stock cache, as the plan counts it (the static step's stores are sized by capacity)
            config_ = SessionConfig(mode=mode, decode_graphs=False, static_decode=False, chunk_size=1024)
            session = Session(model, None, config_, indexer=indexer if mode == "lsa" else None)
            session.generate(prompt, max_new_tokens=args.new_tokens, stop_at_eos=False)
            measured = allocated() - before
            stats = session.stats
            settings = None
            if mode == "lsa":
                tail = min(stats.csa_entries, session.policy.keep_recent)
                selected = stats.selected_per_trigger[-1]
                older = stats.csa_entries - tail
                settings = LSASettings(resident_fraction=(selected - tail) / older if older else 0.0,
                                       keep_recent=session.policy.keep_recent, memory_layers=len(layers), tau=64)
            plan = sequence_state(config, context, mode, settings)
            rows.append({"what": "sequence state", "mode": mode, "context": context, "plan": plan.device_total,
                         "plan_budget": plan.device_budget, "measured": measured,
                         "runtime_count": stats.device_total, "csa_entries": stats.csa_entries,
                         "resident_entries": stats.resident_entries,
                         "note": "" if settings is None else f"resident fraction {settings.resident_fraction:.3f}"})
            del session, stats
            gc.collect()
            torch.cuda.empty_cache()

    print(f"{'what':<15} {'mode':<5} {'context':>8} {'plan MiB':>11} {'measured MiB':>13} {'diff':>7} "
          f"{'runtime MiB':>12}  note")
    for row in rows:
        diff = (row["measured"] - row["plan"]) / row["plan"]
        runtime = f"{row['runtime_count'] / 2**20:12.2f}" if row["runtime_count"] is not None else f"{'-':>12}"
        print(f"{row['what']:<15} {row['mode']:<5} {row['context']:>8,} {row['plan'] / 2**20:11.2f} "
              f"{row['measured'] / 2**20:13.2f} {diff:+7.2%} {runtime}  {row['note']}")
        row["diff"] = diff
    if args.json:
        env = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device)}
        Path(args.json).write_text(json.dumps({"environment": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
