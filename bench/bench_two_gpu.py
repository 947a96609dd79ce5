"""One model, one GPU vs two: the Flash-shaped random model loaded on ``cuda:0`` and spread over two GPUs with a
device map; same tokens, bytes per device, decode step time, and `fm-index plan --gpus 2` against the allocations.

Steps (issue 19, part 1 and the weights/state half of part 4):

1. The Flash-shaped random model (``bench/flash_model.py``: V4-Flash attention and KV dimensions, shrunk MoE, bf16;
   about 11.7 GB of safetensors) is built on ``cuda:0`` and saved with ``save_pretrained`` (``--model-dir``; a folder
   holding a saved one is reused), so both loads below go through :func:`lsa_runtime.backbone.load_backbone` as a
   user's checkpoint would.
2. ``load_backbone(dir, device="cuda:0")``: Session full and LSA (a random memory indexer, rank 2048, tau 64, on
   the default memory layers) generate ``--new-tokens`` tokens after a ``--context``-token random prompt; each
   decode step is timed (wall clock after synchronising every GPU; the median over the steps, the first excluded).
3. The same with ``load_backbone(dir, device_map="0:0-21,1:22-42")``: the tokens must equal step 2's; the weights
   and the decoding state measured per device (``torch.cuda.memory_allocated(i)`` growth) beside
   ``memory_plan.count_weights`` (split evenly over 2 GPUs, as `fm-index plan --gpus 2` assumes) and
   ``memory_plan.sequence_state`` (the LSA row is given the resident fraction the run selected), and
   ``Session.stats.device_bytes_by_device`` (the runtime's own count).

CUDA graphs are off in both runs (``decode_graphs=False``) so that the two placements run the same eager code and no
graph pool is counted. Prints tables; ``--json OUT`` writes every number.

    python bench/bench_two_gpu.py --context 16384 --new-tokens 70 --json two_gpu.json
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

DEFAULT_MAP = "0:0-21,1:22-42"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=16384, help="tokens per sequence (prompt + new tokens)")
    parser.add_argument("--new-tokens", type=int, default=70, help="decode steps after the prompt (> tau = 64, so "
                        "that LSA triggers at least once after the prefill)")
    parser.add_argument("--device-map", default=DEFAULT_MAP, help=f"the two-GPU placement (default {DEFAULT_MAP})")
    parser.add_argument("--model-dir", default=None, help="where the Flash-shaped model is saved (reused if it "
                        "holds one; default: a temporary folder, removed at the end)")
    parser.add_argument("--warmup", type=int, default=2048, help="tokens of a warm-up generation per mode and "
                        "placement (one-time allocations and kernel selection are then not measured)")
    parser.add_argument("--chunk-size", type=int, default=1024, help="prefill chunk in tokens")
    parser.add_argument("--json", default=None, help="write every number here")
    args = parser.parse_args(argv)
    if args.new_tokens <= 64:
        parser.error("--new-tokens must exceed tau = 64")
    if args.context <= args.new_tokens:
        parser.error("--context must exceed --new-tokens")
    return args


def synchronize() -> None:
    for i in range(torch.cuda.device_count()):
        torch.cuda.synchronize(i)


def allocated(devices) -> dict[int, int]:
    synchronize()
    gc.collect()
    return {i: torch.cuda.memory_allocated(i) for i in devices}


def save_model(model_dir: Path) -> dict:
    """Build the Flash-shaped model on cuda:0 and save it as safetensors (skipped if ``model_dir`` holds one)."""
    from bench.flash_model import build_flash_model

    if (model_dir / "config.json").exists() and any(model_dir.glob("*.safetensors")):
        return {"saved": False, "seconds": 0.0, "bytes": sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))}
    t0 = time.perf_counter()
    model = build_flash_model(device="cuda:0", dtype=torch.bfloat16)
    model.save_pretrained(str(model_dir))
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"saved": True, "seconds": time.perf_counter() - t0,
            "bytes": sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))}


def make_indexer(config):
    from lsa_runtime.backbone import default_memory_layers
    from lsa_runtime.memory_indexer import MemoryIndexer, MemoryIndexerConfig

    torch.manual_seed(0)
    mcfg = MemoryIndexerConfig.from_backbone_config(config, default_memory_layers(config), rank=2048, tau=64)
    indexer = MemoryIndexer(mcfg).to(device="cuda:0", dtype=torch.bfloat16)
    indexer.cuda_graphs = False
    return indexer


def decode(model, mode: str, prompt: list[int], new_tokens: int, indexer, chunk_size: int):
    """One Session generation; returns (tokens, per-step seconds after the first token, the session)."""
    from lsa_runtime.session import Session, SessionConfig

    # the stock path on one GPU as on two (a spread model cannot take the static step)
    session = Session(model, None, SessionConfig(mode=mode, decode_graphs=False, static_decode=False,
                                                 chunk_size=chunk_size),
                      indexer=indexer if mode == "lsa" else None)
    tokens, stamps = [], []
    synchronize()
    for item in session.stream(prompt, max_new_tokens=new_tokens, stop_at_eos=False):
        synchronize()
        stamps.append(time.perf_counter())
        tokens.append(int(item.token_id))
    steps = [b - a for a, b in itertools.pairwise(stamps)]
    return tokens, steps, session


def run_placement(model_dir: Path, placement: dict, prompt, warm, args, indexer_holder: dict) -> dict:
    """Load the model with ``placement`` (device= or device_map=), warm up, and decode full and LSA; per device
    the weights and each mode's state (allocation growth while the session is alive)."""
    from lsa_runtime.backbone import load_backbone

    devices = list(range(torch.cuda.device_count()))
    before = allocated(devices)
    t0 = time.perf_counter()
    model, _ = load_backbone(str(model_dir), **placement)
    load_seconds = time.perf_counter() - t0
    after = allocated(devices)
    out = {"placement": placement, "load_seconds": load_seconds,
           "weights_by_device": {i: after[i] - before[i] for i in devices}, "modes": {}}
    if "indexer" not in indexer_holder:
        indexer_holder["indexer"] = make_indexer(model.config)
    indexer = indexer_holder["indexer"]
    for mode in ("full", "lsa"):
        decode(model, mode, warm, args.new_tokens, indexer, args.chunk_size)
    gc.collect()
    torch.cuda.empty_cache()
    for mode in ("full", "lsa"):
        start = allocated(devices)
        tokens, steps, session = decode(model, mode, prompt, args.new_tokens, indexer, args.chunk_size)
        held = allocated(devices)
        stats = session.stats
        row = {"tokens": tokens, "step_ms_median": 1e3 * statistics.median(steps),
               "step_ms_min": 1e3 * min(steps), "steps": len(steps),
               "state_by_device": {i: held[i] - start[i] for i in devices},
               "runtime_device_bytes": stats.device_total,
               "runtime_device_bytes_by_device": dict(stats.device_bytes_by_device),
               "csa_entries": stats.csa_entries, "resident_entries": stats.resident_entries,
               "prefill_seconds": stats.prefill_seconds}
        if mode == "lsa":
            tail = min(stats.csa_entries, session.policy.keep_recent)
            older = stats.csa_entries - tail
            selected = stats.selected_per_trigger[-1] if stats.selected_per_trigger else 0
            row["resident_fraction"] = (selected - tail) / older if older else 0.0
            row["keep_recent"] = session.policy.keep_recent
        out["modes"][mode] = row
        del session, stats
        gc.collect()
        torch.cuda.empty_cache()
    out["config"] = model.config
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return out


def plan_rows(config, split: dict, context: int) -> list[dict]:
    from lsa_runtime.backbone import default_memory_layers
    from lsa_runtime.memory_plan import LSASettings, count_weights, sequence_state

    weights = count_weights(config).bytes
    rows = [{"what": "weights", "mode": "-", "plan_total": weights, "plan_per_gpu": -(-weights // 2),
             "measured_by_device": split["weights_by_device"]}]
    for mode in ("full", "lsa"):
        row = split["modes"][mode]
        settings = None
        if mode == "lsa":
            settings = LSASettings(resident_fraction=row["resident_fraction"], keep_recent=row["keep_recent"],
                                   memory_layers=len(default_memory_layers(config)), tau=64)
        plan = sequence_state(config, context, mode, settings).device_total
        rows.append({"what": "sequence state", "mode": mode, "plan_total": plan, "plan_per_gpu": None,
                     "measured_by_device": row["state_by_device"],
                     "runtime_by_device": row["runtime_device_bytes_by_device"]})
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        print(f"bench_two_gpu needs 2 CUDA devices, found {found}", file=sys.stderr)
        sys.exit(2)
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    temp = None
    if args.model_dir is None:
        temp = tempfile.TemporaryDirectory(prefix="flash_model_")
        model_dir = Path(temp.name)
    else:
        model_dir = Path(args.model_dir)
        model_dir.mkdir(parents=True, exist_ok=True)
    try:
        saved = save_model(model_dir)
        print(f"Flash-shaped model: {saved['bytes'] / 1e9:.2f} GB of safetensors in {model_dir}"
              + (f" (built and saved in {saved['seconds']:.0f} s)" if saved["saved"] else " (reused)"), flush=True)
        from transformers import AutoConfig

        vocab = AutoConfig.from_pretrained(str(model_dir)).vocab_size
        gen = torch.Generator().manual_seed(0)
        warm = torch.randint(3, vocab, (args.warmup,), generator=gen).tolist()
        prompt = torch.randint(3, vocab, (args.context - args.new_tokens,), generator=gen).tolist()
        holder: dict = {}
        one = run_placement(model_dir, {"device": "cuda:0"}, prompt, warm, args, holder)
        print(f"one GPU: loaded in {one['load_seconds']:.0f} s", flush=True)
        two = run_placement(model_dir, {"device_map": args.device_map}, prompt, warm, args, holder)
        print(f"two GPUs ({args.device_map}): loaded in {two['load_seconds']:.0f} s", flush=True)
    finally:
        if temp is not None:
            temp.cleanup()

    config = two.pop("config")
    one.pop("config")
    gib = 2**20
    print(f"\n{'mode':<5} {'same tokens':>11} {'1 GPU ms/step':>14} {'2 GPU ms/step':>14} {'ratio':>6}  "
          f"runtime MiB by device (2 GPUs)")
    same = {}
    for mode in ("full", "lsa"):
        a, b = one["modes"][mode], two["modes"][mode]
        same[mode] = a["tokens"] == b["tokens"]
        first_diff = next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y), None)
        by_dev = ", ".join(f"{k}: {v / gib:.1f}" for k, v in sorted(b["runtime_device_bytes_by_device"].items()))
        print(f"{mode:<5} {str(same[mode]) + ('' if first_diff is None else f' (@{first_diff})'):>11} "
              f"{a['step_ms_median']:14.2f} {b['step_ms_median']:14.2f} "
              f"{b['step_ms_median'] / a['step_ms_median']:6.2f}  {by_dev}")
    rows = plan_rows(config, two, args.context)
    print(f"\n{'what':<15} {'mode':<5} {'plan MiB':>10} {'plan/GPU':>9} {'GPU0 MiB':>9} {'GPU1 MiB':>9} "
          f"{'sum MiB':>9} {'diff':>7}  runtime count by device")
    for row in rows:
        measured = row["measured_by_device"]
        total = sum(measured.values())
        row["diff"] = (total - row["plan_total"]) / row["plan_total"] if row["plan_total"] else None
        per_gpu = f"{row['plan_per_gpu'] / gib:9.1f}" if row["plan_per_gpu"] else f"{'-':>9}"
        runtime = ", ".join(f"{k}: {v / gib:.2f}" for k, v in sorted(row.get("runtime_by_device", {}).items()))
        print(f"{row['what']:<15} {row['mode']:<5} {row['plan_total'] / gib:10.1f} {per_gpu} "
              f"{measured.get(0, 0) / gib:9.1f} {measured.get(1, 0) / gib:9.1f} {total / gib:9.1f} "
              f"{row['diff']:+7.2%}  {runtime}")
    result = {"date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv), "devices": names,
              "torch": torch.__version__, "context": args.context, "new_tokens": args.new_tokens,
              "device_map": args.device_map, "model_bytes": saved["bytes"], "same_tokens": same,
              "one_gpu": one, "two_gpus": two, "plan": rows}
    if args.json:
        tmp = Path(args.json).with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1, default=str))
        tmp.replace(args.json)
    if not all(same.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
