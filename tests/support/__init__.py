"""Helpers shared by the test tiers: the tiny model and data they train on, and the real entry points
run the way a user runs them (the installed console script, in a fresh process)."""
