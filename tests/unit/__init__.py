"""The unit tier as a package: its test modules may share a name with another tier's (test_cli_grammar.py)."""
