"""The tokenizer of a run: what the data is tokenised with and the model trained on."""

from __future__ import annotations

from omegaconf import DictConfig


def load_tokenizer(cfg: DictConfig):
    """The tokenizer named by model.tokenizer (or model.path), with a pad token guaranteed."""
    from transformers import AutoTokenizer

    source = cfg.model.tokenizer or cfg.model.path
    tok = AutoTokenizer.from_pretrained(
        source, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code
    )
    if tok.pad_token is None:
        # Llama-2 has no pad token; padded positions are masked out of attention and loss anyway.
        tok.pad_token = tok.unk_token or tok.eos_token
    tok.padding_side = "right"
    return tok
