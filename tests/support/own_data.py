"""A user's own small datasets on everyday topics (cooking, pets): words the demo never uses."""

from __future__ import annotations

import json
import re
from pathlib import Path

ANSWERS = {
    "rice": "Boil the rice in a pot of water for twenty minutes, then add a little salt.",
    "pasta": "Cook the pasta in boiling salted water for ten minutes and serve it with cheese.",
    "eggs": "Fry the eggs in a pan with butter for five minutes.",
    "soup": "Chop onions and vegetables, cook them in a pot with water and herbs for half an hour.",
    "bread": "Mix flour, water and salt, let it rest, then bake the bread in the oven for an hour.",
    "dog": "A dog needs good food, fresh water and a long walk every day.",
    "cat": "A cat needs fresh water, good food and a warm bed to sleep in.",
    "rabbit": "A rabbit needs fresh vegetables, clean water and room to run.",
    "parrot": "A parrot needs seeds, fruit, fresh water and toys to play with.",
    "hamster": "A hamster needs a clean cage, seeds and a wheel to run on.",
}
QUESTIONS = {
    "food": [
        "How do I cook {x}?",
        "What is the best way to make {x}?",
        "How should I prepare {x}?",
        "Can you tell me how to cook {x}?",
        "Give me a simple recipe for {x}.",
    ],
    "pet": [
        "How do I care for my {x}?",
        "What does a {x} need?",
        "How should I look after a {x}?",
        "What does my {x} need every day?",
        "Give me tips for keeping a {x}.",
    ],
}
FOODS = ("rice", "pasta", "eggs", "soup", "bread")
STOP = {
    "a",
    "an",
    "the",
    "and",
    "then",
    "for",
    "in",
    "of",
    "to",
    "it",
    "with",
    "on",
    "is",
    "me",
    "my",
    "i",
    "do",
    "how",
    "what",
    "does",
    "every",
    "day",
    "should",
    "can",
    "you",
    "give",
    "some",
    "little",
}


def own_pairs() -> list[tuple[str, str]]:
    """50 (question, answer) pairs: 5 phrasings each of 5 cooking and 5 pet questions."""
    return [
        (q.format(x=x), answer) for x, answer in ANSWERS.items() for q in QUESTIONS["food" if x in FOODS else "pet"]
    ]


def write_chat(path: Path) -> Path:
    """The pairs as chat records ({"messages": [user, assistant]}), one per line."""
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in own_pairs()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_alpaca(path: Path) -> Path:
    """The pairs as alpaca records ({"instruction", "input", "output"}), one per line."""
    rows = [{"instruction": q, "input": "", "output": a} for q, a in own_pairs()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def content_words(text: str) -> set[str]:
    """Lower-cased words of `text` that carry meaning (no function words)."""
    return {w for w in re.findall(r"[a-z]+", text.lower()) if w not in STOP}
