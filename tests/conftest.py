import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model():
    from lsa_runtime.backbone import load_backbone

    model, _ = load_backbone("tiny", dtype=torch.float32)
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from lsa_runtime.backbone import load_backbone

    return load_backbone("tiny")[1]


@pytest.fixture(scope="session")
def sample_ids():
    """A fixed pseudo-random token sequence (1,024 ids) for the tiny model."""
    gen = torch.Generator().manual_seed(1234)
    return torch.randint(3, 1024, (1024,), generator=gen)


@pytest.fixture
def small_corpus(tmp_path):
    """Five documents as input_ids: three long enough for triggers at tau=16, one too short, one mid."""
    gen = torch.Generator().manual_seed(7)
    lengths = [150, 20, 97, 130, 64]
    path = tmp_path / "corpus.jsonl"
    with path.open("w") as f:
        for i, n in enumerate(lengths):
            ids = torch.randint(3, 1024, (n,), generator=gen).tolist()
            f.write(json.dumps({"id": f"doc{i}", "input_ids": ids}) + "\n")
    return path


@pytest.fixture(scope="module")
def backbone():
    """(model, tokenizer) of the bundled tiny backbone in float32: one copy per test module (Sessions swap its
    CSA compressors)."""
    from lsa_runtime.backbone import load_backbone

    return load_backbone("tiny", dtype=torch.float32)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module: the tiny model is latency-bound, and with 2 shared cores one thread is
    several times faster (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
