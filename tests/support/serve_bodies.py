"""Request bodies for the serve endpoint's search for 500s (tests/unit/test_serve_requests.py): what a client may send
within each field's range, the edges included, and one field outside it. Imported by the test that searches, so
that collecting the suite does not import hypothesis (about a second a process)."""

from __future__ import annotations

from hypothesis import strategies as st

TEXT = st.text(max_size=30) | st.sampled_from(["", " ", "</s>", "<s>[INST]", "\u2603"])
ANY = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT | st.just("\ud800"),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=6,
)
ROLE = st.sampled_from(["system", "developer", "user", "assistant"])
CONTENT = TEXT | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}), max_size=2)
MESSAGES = st.builds(
    lambda head, last: head + [{"role": "user", "content": last}],
    st.lists(st.fixed_dictionaries({"role": ROLE, "content": CONTENT}), max_size=2),
    CONTENT,
)
# what a client may send within each field's range, the edges included (None: the field not given)
FIELDS = {
    "model": st.just("tiny-llama"),
    "prompt": TEXT | st.lists(TEXT, min_size=1, max_size=3),
    "messages": MESSAGES,
    "max_tokens": st.none() | st.integers(1, 4),
    "max_completion_tokens": st.none() | st.integers(1, 4),
    "temperature": st.none() | st.sampled_from([1e-300, 5e-324, 1e-8, 0.0, 2.0]) | st.floats(0, 2),
    "top_p": st.none() | st.sampled_from([1e-300, 5e-324, 1.0]) | st.floats(0, 1, exclude_min=True),
    "stop": st.none() | TEXT | st.lists(TEXT, max_size=4),
    "seed": st.none() | st.integers(-(2**63), 2**63 - 1),
    "stream": st.none() | st.booleans(),
    "stream_options": st.none() | st.fixed_dictionaries({"include_usage": st.booleans()}),
    "logprobs": st.none() | st.booleans() | st.integers(0, 5),
    "top_logprobs": st.none() | st.integers(0, 20),
    "n": st.none() | st.just(1),
    "response_format": st.none() | st.just({"type": "text"}),
}
# and one field outside it: a mistake a client may make, or anything at all
EDGES = st.sampled_from(
    [
        ("model", "nope"),
        ("prompt", "a\ud800"),
        ("messages", [{"role": "user", "content": "\udfff"}]),
        ("messages", [{"role": "tool", "content": "x"}]),
        ("messages", []),
        ("max_tokens", 0),
        ("max_tokens", 17),
        ("max_tokens", 2**70),
        ("temperature", 2.0001),
        ("temperature", -1e-300),
        ("top_p", 0.0),
        ("n", 2),
        ("seed", 2**63),
        ("seed", 2**70),
        ("seed", -(2**63) - 1),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("logprobs", 6),
        ("top_logprobs", 21),
        ("echo", True),
        ("tools", [{"type": "function", "function": {"name": "f"}}]),
        ("response_format", {"type": "json_object"}),
        ("temperature", float("nan")),
        ("seed", float("inf")),
    ]
)
BODY = st.fixed_dictionaries(FIELDS).map(
    lambda body: {
        key: value
        for key, value in body.items()
        if value is not None and (key != "top_logprobs" or body["logprobs"] is True)
    }
)
MISTAKE = st.none() | EDGES | st.tuples(st.sampled_from(list(FIELDS)), ANY)
