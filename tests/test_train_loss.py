"""The training loss against hand-computed BCE / focal values, and the batch loss against a direct computation."""

import math
import os

import pytest
import torch

from indexer_train.collator import LabelRowCollator, pad_positives
from indexer_train.dual_encoder import build_dual_encoder, key_side
from indexer_train.loss import MemoryIndexerLoss, elementwise_loss, multi_hot
from tests.test_memory_indexer import small_config


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_bce_and_focal_equal_hand_computation():
    logits = torch.tensor([[2.0, -1.0, 0.5, 0.0]])
    targets = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    bce = elementwise_loss(logits, targets, "bce")[0].tolist()
    # -log p for positives, -log(1 - p) for negatives
    hand_bce = [-math.log(sig(2.0)), -math.log(1 - sig(-1.0)), -math.log(1 - sig(0.5)), -math.log(0.5)]
    assert bce == pytest.approx(hand_bce, rel=1e-6)
    focal = elementwise_loss(logits, targets, "focal", gamma=2.0, alpha=0.25)[0].tolist()
    hand_focal = [
        -0.25 * (1 - sig(2.0)) ** 2 * math.log(sig(2.0)),
        -0.75 * sig(-1.0) ** 2 * math.log(1 - sig(-1.0)),
        -0.75 * sig(0.5) ** 2 * math.log(1 - sig(0.5)),
        -0.25 * 0.5 ** 2 * math.log(0.5),
    ]
    assert focal == pytest.approx(hand_focal, rel=1e-6)
    no_alpha = elementwise_loss(logits, targets, "focal", gamma=1.0, alpha=-1)[0].tolist()
    assert no_alpha[0] == pytest.approx(-(1 - sig(2.0)) * math.log(sig(2.0)), rel=1e-6)
    # gamma = 0 and no alpha is plain BCE
    assert elementwise_loss(logits, targets, "focal", gamma=0.0, alpha=-1)[0].tolist() == pytest.approx(hand_bce)


def test_multi_hot_ignores_padding_and_out_of_range():
    pos = pad_positives([[0, 3], [], [5, 1]])
    assert pos.tolist() == [[0, 3], [-1, -1], [5, 1]]
    assert multi_hot(pos, 4).tolist() == [[1, 0, 0, 1], [0, 0, 0, 0], [0, 1, 0, 0]]


ONE_PASS = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                              reason="the loss-in-forward kernel needs a CUDA device (or TRITON_INTERPRET=1)")


@pytest.mark.parametrize("kind,fused", [("bce", False), ("focal", False),
                                        pytest.param("bce", True, marks=ONE_PASS),
                                        pytest.param("focal", True, marks=ONE_PASS)])
def test_batch_loss_equals_direct_per_row_mean(kind, fused):
    """Rows of two documents (one shared key tensor each): mean over rows of the mean over visible entries; the
    same with the loss computed in the forward kernel (16 heads x 16 dims there: tl.dot needs powers of two)."""
    torch.manual_seed(0)
    dim = 16 if fused else 8
    cfg = small_config(index_n_heads=16, index_head_dim=16, rope_dim=8, rope_head_dim_base=32) if fused else \
        small_config()
    model = build_dual_encoder(cfg)
    gen = torch.Generator().manual_seed(3)
    keys = {(d, L): torch.randn(30, dim, generator=gen).half() for d in (0, 1) for L in (2, 4)}
    key_side(model).attach(lambda d, L: keys[(d, L)])
    rows = []
    for doc, pos, nv, positives in [(0, 40, 10, [1, 4]), (0, 80, 20, [0, 19]), (1, 100, 25, [3]), (1, 119, 30, [])]:
        for L in (2, 4):
            rows.append({"doc_index": doc, "layer": L, "position": pos, "n_visible": nv,
                         "hidden": torch.randn(10, generator=gen).half(),
                         "positives": torch.tensor(positives, dtype=torch.long)})
    batch = LabelRowCollator()(rows)
    features = [{k[len("query_"):]: v for k, v in batch.items() if k.startswith("query_")},
                {k[len("document_"):]: v for k, v in batch.items() if k.startswith("document_")}]
    loss_fn = MemoryIndexerLoss(model, loss=kind, gamma=2.0, alpha=0.25, chunk_size=7, fused=fused)
    got = loss_fn(features, batch["label"])
    indexer = model[0].sub_modules["query"][0].indexer
    per_row = []
    for r in rows:
        nv = r["n_visible"]
        logits = indexer.logits(r["layer"], r["hidden"].float().reshape(1, -1), [r["position"]],
                                keys[(r["doc_index"], r["layer"])][:nv].float())[0].double()
        y = torch.zeros(nv, dtype=torch.float64)
        y[r["positives"]] = 1.0
        p = torch.sigmoid(logits)
        if kind == "bce":
            l_s = -(y * torch.log(p) + (1 - y) * torch.log(1 - p))
        else:
            p_t = torch.where(y > 0, p, 1 - p)
            l_s = -torch.where(y > 0, 0.25, 0.75) * (1 - p_t) ** 2 * torch.log(p_t)
        per_row.append(l_s.mean())
    expected = torch.stack(per_row).mean()
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    got.backward()  # gradients reach every layer's W_DQ, W_IUQ, W_w
    for p in indexer.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_ranking_auc_equals_pairwise_count():
    from indexer_train.evaluator import ranking_auc

    gen = torch.Generator().manual_seed(5)
    scores = torch.randint(0, 6, (40,), generator=gen).float()  # many ties
    gold = torch.rand(40, generator=gen) < 0.4
    pos, neg = scores[gold], scores[~gold]
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert ranking_auc(scores, gold) == pytest.approx(pairs.mean().item(), rel=1e-12)
    assert ranking_auc(scores, torch.ones(40, dtype=torch.bool)) is None
    assert ranking_auc(torch.arange(4.0), torch.tensor([False, False, True, True])) == 1.0
