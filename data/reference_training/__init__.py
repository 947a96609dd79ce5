"""How the bundled ``reference`` DeepSeek-V4 was built: corpus, tokenizer, training and needle evaluation.

Steps (each a module, run with ``python -m data.reference_training.<step>``): ``build_corpus`` (stdlib
source -> byte-level BPE tokenizer + token array), ``train`` (language modelling + Lightning-Indexer
distillation, resumable), ``evaluate_needles`` (seeded needle-in-a-haystack accuracy), ``export`` (the
bundled bf16 checkpoint in ``data/reference/``). See ``data/reference/README.md`` for the commands that were run.
"""
