"""How the bundled backbones were built: ``tiny`` (random, :mod:`.build_tiny`) and ``reference`` (trained).

``data/`` holds only the assets (weights, configs, tokenizers, the sample corpus); the programs that made them
live here. This package is not installed with fm-index: run its modules from a checkout.

Reference steps (each a module, run with ``python -m reference.<step>``): ``build_corpus`` (stdlib
source -> byte-level BPE tokenizer + token array), ``train`` (language modelling + Lightning-Indexer
distillation, resumable), ``evaluate_needles`` (seeded needle-in-a-haystack accuracy), ``export`` (the
bundled bf16 checkpoint in ``data/reference/``). ``attention`` is the exact window + top-k attention that makes
training and evaluating at 16K-64K tokens affordable (used by ``train`` and ``evaluate_needles``).
See ``data/reference/README.md`` for the commands that were run.
"""
