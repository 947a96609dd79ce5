"""IncrementalText (lsa_runtime/detokenize.py): the pieces, joined, are the sequence decoded at once. Oracle: the
tokenizer's own ``decode`` of the whole sequence, on both bundled tokenizers, for text with multi-byte characters
(as far as the small vocabularies encode them) and random token streams (which end inside characters); and the Session's
streamed pieces joined are its returned text."""

import random

import pytest
import torch

from lsa_runtime.backbone import load_backbone
from lsa_runtime.detokenize import IncrementalText
from lsa_runtime.session import Session

TEXTS = ["Hello, world! ünïcödé 中文字符 😀 emoji  two spaces\n\tand a tab",
         "def f(x):\n    return x ** 2  # ∑ over Ω\n"]


@pytest.mark.parametrize("name", ["tiny", "reference"])
def test_pieces_joined_are_the_whole_decode(name):
    _, tokenizer = load_backbone(name, dtype=torch.float32)
    rng = random.Random(0)
    sequences = [tokenizer.encode(t, add_special_tokens=False) for t in TEXTS]
    sequences += [[rng.randrange(len(tokenizer)) for _ in range(rng.randrange(1, 200))] for _ in range(100)]
    held_back = 0
    for ids in sequences:
        text = IncrementalText(tokenizer)
        pieces = [text.add(t) for t in ids]
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        joined = "".join(pieces)
        assert whole.startswith(joined)
        rest = whole[len(joined):]  # held back: only an unfinished character at the end (U+FFFD in the whole)
        assert rest == "" or rest.endswith("\ufffd"), (joined[-20:], rest)
        held_back += bool(rest)
    assert held_back > 0  # the random streams did end inside characters: the case was exercised


def test_session_stream_pieces_join_to_the_returned_text(backbone):
    model, tokenizer = backbone
    prompts = [torch.randint(3, 1024, (40,), generator=torch.Generator().manual_seed(i)).tolist() for i in range(2)]
    session = Session(model, tokenizer, mode="full", max_batch=2)
    pieces = {0: "", 1: ""}
    for item in session.stream(prompts, max_new_tokens=30, stop_at_eos=False):
        pieces[item.sequence] += item.text
    outs = session.generate(prompts, max_new_tokens=30, stop_at_eos=False)
    for i, out in enumerate(outs):
        assert pieces[i] == out.text == tokenizer.decode(out.token_ids, skip_special_tokens=True)
