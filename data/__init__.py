"""Bundled small backbones (``tiny``, later ``reference``), their tokenizers and a sample corpus."""
