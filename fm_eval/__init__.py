"""fm_eval: long-context evaluation of DeepSeek-V4 decoding modes (``fm-index evaluate``).

:mod:`.tasks` generates RULER-style prompts (needles, variable tracking, common/frequent words,
context-independent questions) sized in the model's tokens and scores answers with RULER's string match;
:mod:`.runner` decodes them with :class:`lsa_runtime.Session` in every mode at a shared resident budget
(resumable, several worker processes); :mod:`.report` writes the summaries, the markdown table and the plots, with
the 95% intervals of :mod:`.intervals`.
Imports go one way: ``cli.py -> fm_eval -> lsa_runtime``; no training code is used here.
"""

# The modes an evaluation runs, in the order they run within a cell (full first: the oracle replays its picks;
# lsa before the controls: its selected entries are their budget) and appear in reports.
MODES = ("full", "lsa", "hisparse", "recent", "random", "oracle")
