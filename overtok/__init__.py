"""overtok: scaling-law experiments for Over-Tokenized Transformers (Huang et al., ICML 2025)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # torch is imported only when the hash is asked for, so the CLI and analysis commands start fast
    if name == "ngram_ids":
        from overtok.ngram import ngram_ids

        return ngram_ids
    raise AttributeError(name)
