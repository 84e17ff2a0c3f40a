"""Data preparation: records read, formatted and tokenised into the cache, split and packed."""
