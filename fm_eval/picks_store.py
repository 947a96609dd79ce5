"""The full run's native top-k picks, kept beside an evaluation so a resumed oracle run does not decode full again.

The oracle (``lsa_runtime.policies.OraclePolicy``) replays, for each decode query position t, the entries the stock
model's native top-k picked at any CSA layer (``record_native_picks``). Those picks come from an unbatched full
decode of the same prompt; without them on disk, every resumed cell with oracle runs left decodes its prompts in
full again before its first oracle run can finish (at 64K tokens on an H200, minutes per cell).

One safetensors file per prompt, ``picks/<task>@<length>#<index>.safetensors``, read with safetensors' safe
loader: ``positions`` (int64 [P], ascending), ``offsets`` (int64 [P + 1]) and ``entries`` (int32 [N]; query
``positions[j]`` picked ``entries[offsets[j]:offsets[j + 1]]``), and in its metadata the prompt's digest. A file
whose digest is not the prompt's (another tokenizer or haystack) is ignored: the picks are decoded again.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lsa_runtime.outputs import temp_path

FORMAT = "fm-index-native-picks/1"


def picks_path(out: str | Path, task: str, length: int, index: int) -> Path:
    return Path(out) / "picks" / f"{task}@{int(length)}#{int(index)}.safetensors"


def save_picks(path: str | Path, picks: dict[int, torch.Tensor], prompt_sha: str) -> Path:
    """Write ``picks`` ({query position: entry indices}) for the prompt of digest ``prompt_sha``, atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    positions = sorted(int(t) for t in picks)
    parts = [picks[t].reshape(-1).to(torch.int64) for t in positions]
    if any(int(p.min()) < 0 or int(p.max()) >= 2**31 for p in parts if p.numel()):
        raise ValueError("entry indices must lie in [0, 2**31)")
    sizes = torch.tensor([0] + [p.numel() for p in parts], dtype=torch.int64)
    tensors = {"positions": torch.tensor(positions, dtype=torch.int64), "offsets": torch.cumsum(sizes, 0),
               "entries": (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)).to(torch.int32)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    save_file(tensors, str(tmp), metadata={"format": FORMAT, "prompt_sha": str(prompt_sha)})
    os.replace(tmp, path)
    return path


def load_picks(path: str | Path, prompt_sha: str) -> dict[int, torch.Tensor] | None:
    """The picks stored at ``path`` for the prompt of digest ``prompt_sha``; None when there are none for it (no
    file, another prompt's, another format, or a file that does not hold together)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT or meta.get("prompt_sha") != str(prompt_sha):
                return None
            positions, offsets, entries = (f.get_tensor(k) for k in ("positions", "offsets", "entries"))
    except (SafetensorError, OSError, KeyError):
        return None
    if (offsets.numel() != positions.numel() + 1 or int(offsets[0]) != 0 or int(offsets[-1]) != entries.numel()
            or bool((offsets[1:] < offsets[:-1]).any())):
        return None
    entries = entries.to(torch.int64)
    return {int(t): entries[int(offsets[j]):int(offsets[j + 1])] for j, t in enumerate(positions.tolist())}
