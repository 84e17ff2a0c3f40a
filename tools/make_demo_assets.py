"""Build the demo assets shipped in conf/assets: a tiny pre-trained Llama and its dataset.

The project's default job fine-tunes a LoRA on CPU in well under a minute. A LoRA on a
*random* base learns far too slowly for that, so this script pre-trains a tiny
Llama-architecture base model once, offline, and ships it with the repo. The story is
the usual one of instruction tuning, in miniature: pre-training gives the model
knowledge, the LoRA fine-tune teaches it to answer questions in the chat format.

What it does, deterministically (everything is seeded):

1. The world: a fixed table of 45 countries with their capital, continent and language.
2. The demo instruction dataset (``conf/assets/demo/train.jsonl``): questions about the
   table asked in many phrasings, answered with one sentence, e.g.
   ``{"instruction": "Where is Italy?", "input": "", "output": "Italy is in Europe."}``.
3. A plain-text pre-training corpus about the same table: short paragraphs of
   statements ("The capital of Italy is Rome. Italy is a country in Europe."), mixed
   with statements on everyday topics (cooking, pets, weather, home, health, travel) so
   that a user's own data on such topics trains too. It holds no question and never
   uses the ``[INST] ... [/INST]`` chat format, so before the fine-tune the model does
   not answer questions (the first eval loss is high).
4. A byte-level BPE tokenizer built with the ``tokenizers`` library: the 256 bytes are
   its base vocabulary, so any UTF-8 text encodes without an unknown token; merges are
   learnt on the corpus. Llama's special tokens ``<unk> <s> </s>`` plus ``<pad>``,
   ``<s>`` added by ``encode()`` like Llama's, and a Llama-2 chat template.
5. Pre-trains the tiny model as a plain causal LM on the corpus (a few minutes on 2 CPU
   cores), checks that it learnt the facts, and writes ``conf/assets/tiny-llama/``
   (config, safetensors, tokenizer, README).

Rerun from the repository root (needs torch, transformers, tokenizers, safetensors; no
network, no GPU):

    python tools/make_demo_assets.py            # rewrites conf/assets/{demo,tiny-llama}
    python tools/make_demo_assets.py --help     # options (sizes, steps, output dir)

Then check the bar of the default job with ``python tools/check_demo_bar.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ASSETS = REPO / "conf" / "assets"

SEED = 1234

# --------------------------------------------------------------------------------------
# The world: country, capital, continent, language.
# --------------------------------------------------------------------------------------
COUNTRIES = [
    ("France", "Paris", "Europe", "French"),
    ("Germany", "Berlin", "Europe", "German"),
    ("Italy", "Rome", "Europe", "Italian"),
    ("Spain", "Madrid", "Europe", "Spanish"),
    ("Portugal", "Lisbon", "Europe", "Portuguese"),
    ("Greece", "Athens", "Europe", "Greek"),
    ("Poland", "Warsaw", "Europe", "Polish"),
    ("Sweden", "Stockholm", "Europe", "Swedish"),
    ("Norway", "Oslo", "Europe", "Norwegian"),
    ("Finland", "Helsinki", "Europe", "Finnish"),
    ("Denmark", "Copenhagen", "Europe", "Danish"),
    ("the Netherlands", "Amsterdam", "Europe", "Dutch"),
    ("Ireland", "Dublin", "Europe", "English"),
    ("Austria", "Vienna", "Europe", "German"),
    ("Hungary", "Budapest", "Europe", "Hungarian"),
    ("Romania", "Bucharest", "Europe", "Romanian"),
    ("Ukraine", "Kyiv", "Europe", "Ukrainian"),
    ("Japan", "Tokyo", "Asia", "Japanese"),
    ("China", "Beijing", "Asia", "Chinese"),
    ("India", "New Delhi", "Asia", "Hindi"),
    ("Thailand", "Bangkok", "Asia", "Thai"),
    ("Vietnam", "Hanoi", "Asia", "Vietnamese"),
    ("Indonesia", "Jakarta", "Asia", "Indonesian"),
    ("South Korea", "Seoul", "Asia", "Korean"),
    ("Iran", "Tehran", "Asia", "Persian"),
    ("Mongolia", "Ulaanbaatar", "Asia", "Mongolian"),
    ("Egypt", "Cairo", "Africa", "Arabic"),
    ("Kenya", "Nairobi", "Africa", "Swahili"),
    ("Nigeria", "Abuja", "Africa", "English"),
    ("Ethiopia", "Addis Ababa", "Africa", "Amharic"),
    ("Morocco", "Rabat", "Africa", "Arabic"),
    ("Ghana", "Accra", "Africa", "English"),
    ("Senegal", "Dakar", "Africa", "French"),
    ("Brazil", "Brasilia", "South America", "Portuguese"),
    ("Argentina", "Buenos Aires", "South America", "Spanish"),
    ("Chile", "Santiago", "South America", "Spanish"),
    ("Peru", "Lima", "South America", "Spanish"),
    ("Colombia", "Bogota", "South America", "Spanish"),
    ("Venezuela", "Caracas", "South America", "Spanish"),
    ("Canada", "Ottawa", "North America", "English"),
    ("Mexico", "Mexico City", "North America", "Spanish"),
    ("Cuba", "Havana", "North America", "Spanish"),
    ("Jamaica", "Kingston", "North America", "English"),
    ("Australia", "Canberra", "Oceania", "English"),
    ("New Zealand", "Wellington", "Oceania", "English"),
]


def cap(s: str) -> str:
    """'the Netherlands' -> 'The Netherlands' at the start of a sentence."""
    return s[:1].upper() + s[1:]


# --------------------------------------------------------------------------------------
# The demo dataset: questions in many phrasings, one answer form per kind of question.
# --------------------------------------------------------------------------------------
QUESTIONS = {
    "continent": [
        "Where is {c}?",
        "Where is {c} located?",
        "Which continent is {c} in?",
        "On which continent is {c}?",
        "In what part of the world is {c}?",
        "Tell me the continent of {c}.",
        "What continent is {c} on?",
        "Where in the world is {c}?",
        "Which continent does {c} belong to?",
        "Where can I find {c} on a map?",
    ],
    "capital": [
        "What is the capital of {c}?",
        "What is the capital city of {c}?",
        "Name the capital of {c}.",
        "Which city is the capital of {c}?",
        "Tell me the capital of {c}.",
        "What city is the capital of {c}?",
        "Do you know the capital of {c}?",
        "Capital of {c}?",
        "What's the capital of {c}?",
        "Give me the capital of {c}.",
    ],
    "country": [
        "{k} is the capital of which country?",
        "Which country has {k} as its capital?",
        "Of which country is {k} the capital?",
        "{k} is the capital of what country?",
        "Which country's capital is {k}?",
        "Where is {k}?",
        "In which country is {k}?",
        "Which country is {k} in?",
        "{k} is in which country?",
        "What country is {k} in?",
    ],
    "language": [
        "What language do people speak in {c}?",
        "Which language is spoken in {c}?",
        "What do people in {c} speak?",
        "What is the language of {c}?",
        "Which language do they speak in {c}?",
        "Tell me the language of {c}.",
        "What language is spoken in {c}?",
        "Which language is used in {c}?",
        "What language do they speak in {c}?",
        "In {c}, what language do people speak?",
    ],
    "about": [
        "Tell me about {c}.",
        "What do you know about {c}?",
        "Describe {c}.",
        "Give me some facts about {c}.",
        "What can you tell me about {c}?",
        "Tell me something about {c}.",
        "Tell me a few facts about {c}.",
        "Give me a short description of {c}.",
        "What should I know about {c}?",
        "Write a short note about {c}.",
    ],
}
ANSWERS = {
    "continent": "{C} is in {o}.",
    "capital": "The capital of {c} is {k}.",
    "country": "{k} is the capital of {c}.",
    "language": "People in {c} speak {l}.",
    "about": "{C} is a country in {o}. Its capital is {k} and people there speak {l}.",
}


def make_demo_dataset(seed: int) -> list[dict]:
    """Every (question phrasing, country) pair once, shuffled."""
    rows = []
    for c, k, o, lang in COUNTRIES:
        facts = {"c": c, "C": cap(c), "k": k, "o": o, "l": lang}
        for kind, phrasings in QUESTIONS.items():
            for q in phrasings:
                rows.append(
                    {"instruction": cap(q.format(**facts)), "input": "", "output": ANSWERS[kind].format(**facts)}
                )
    random.Random(seed).shuffle(rows)
    return rows


# --------------------------------------------------------------------------------------
# The pre-training corpus: statements only, several forms of each fact.
# --------------------------------------------------------------------------------------
STATEMENTS = {
    "capital": [
        "The capital of {c} is {k}.",
        "{K} is the capital of {c}.",
        "{C} has {k} as its capital.",
        "{K} is a big city in {c}.",
    ],
    "continent": ["{C} is a country in {o}.", "{C} is in {o}.", "{C} lies in {o}.", "In {o} there is {c}."],
    "language": [
        "People in {c} speak {l}.",
        "{L} is spoken in {c}.",
        "The language of {c} is {l}.",
        "Many people in {c} speak {l}.",
    ],
}
# A paragraph about one country may refer back to it.
FOLLOW_UPS = {"capital": "Its capital is {k}.", "continent": "It is in {o}.", "language": "People there speak {l}."}


def statement(rng: random.Random, kind: str, facts: dict) -> str:
    return rng.choice(STATEMENTS[kind]).format(**facts)


def pretrain_document(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.4:  # a paragraph about one country
        c, k, o, lang = rng.choice(COUNTRIES)
        facts = {"c": c, "C": cap(c), "k": k, "K": cap(k), "o": o, "l": lang, "L": lang}
        kinds = rng.sample(list(STATEMENTS), rng.randint(1, 3))
        out = [statement(rng, kinds[0], facts)]
        out += [
            FOLLOW_UPS[kind].format(**facts) if rng.random() < 0.5 else statement(rng, kind, facts)
            for kind in kinds[1:]
        ]
        return " ".join(out)
    if r < 0.5:  # countries of one continent
        o = rng.choice(sorted({row[2] for row in COUNTRIES}))
        members = [row[0] for row in COUNTRIES if row[2] == o]
        some = rng.sample(members, min(len(members), rng.randint(2, 4)))
        return f"{cap(', '.join(some[:-1]))} and {some[-1]} are countries in {o}."
    out = []  # unrelated statements about several countries
    for _ in range(rng.randint(2, 5)):
        c, k, o, lang = rng.choice(COUNTRIES)
        facts = {"c": c, "C": cap(c), "k": k, "K": cap(k), "o": o, "l": lang, "L": lang}
        out.append(statement(rng, rng.choice(list(STATEMENTS)), facts))
    return " ".join(out)


# --------------------------------------------------------------------------------------
# Everyday English: plain statements on common topics, so that a user's own data about
# cooking, pets or the weather lands on words and phrases the model has seen before.
# --------------------------------------------------------------------------------------
EVERYDAY = {
    "cooking": (
        {
            "food": [
                "rice",
                "pasta",
                "soup",
                "bread",
                "eggs",
                "potatoes",
                "vegetables",
                "fish",
                "chicken",
                "beans",
                "a cake",
                "pancakes",
                "a salad",
                "tea",
                "coffee",
            ],
            "add": [
                "salt",
                "pepper",
                "butter",
                "garlic",
                "onions",
                "olive oil",
                "sugar",
                "herbs",
                "lemon juice",
                "cheese",
                "milk",
                "flour",
            ],
            "tool": ["pot", "pan", "oven", "bowl", "knife", "spoon", "kettle"],
            "verb": ["boil", "bake", "fry", "roast", "steam", "stir", "chop", "cook"],
            "time": ["five minutes", "ten minutes", "twenty minutes", "half an hour", "an hour"],
        },
        [
            "To cook {food}, heat it in a {tool} for {time}.",
            "You can {verb} {food} with a little {add}.",
            "Add some {add} to the {food} before you serve it.",
            "Taste the {food} and add {add} if you like.",
            "A good {tool} makes it easy to {verb} {food}.",
            "Keep {food} in the fridge and eat it soon.",
            "Let the {food} cool for {time} before you eat it.",
            "Wash your hands before you cook.",
            "Many people like {food} with {add}.",
            "Heat the oven before you bake.",
        ],
    ),
    "pets": (
        {
            "pet": ["dog", "cat", "puppy", "kitten", "rabbit", "hamster", "parrot", "goldfish"],
            "need": [
                "fresh water",
                "a warm bed",
                "good food",
                "a clean home",
                "a daily walk",
                "toys to play with",
                "a visit to the vet",
                "love and care",
            ],
            "do": [
                "sleeps a lot",
                "likes to play",
                "needs exercise",
                "loves treats",
                "learns new tricks",
                "follows its owner",
            ],
        },
        [
            "A {pet} needs {need}.",
            "Every {pet} {do}.",
            "Give your {pet} {need} every day.",
            "My {pet} {do}.",
            "A happy {pet} has {need}.",
            "Take your {pet} to the vet once a year.",
            "Feed your {pet} at the same time each day.",
            "A young {pet} {do}.",
        ],
    ),
    "weather": (
        {
            "kind": ["sunny", "rainy", "cloudy", "windy", "cold", "warm", "hot", "snowy"],
            "season": ["spring", "summer", "autumn", "winter"],
            "wear": ["a coat", "a hat", "boots", "a warm jumper", "sunglasses", "a raincoat"],
        },
        [
            "In {season} the weather is often {kind}.",
            "On a {kind} day, wear {wear}.",
            "Take an umbrella when it is rainy.",
            "Today it is {kind} and tomorrow it will be {kind}.",
            "Many people enjoy {kind} days in {season}.",
            "Drink water when it is hot outside.",
        ],
    ),
    "home": (
        {
            "room": ["kitchen", "bedroom", "bathroom", "living room", "garden"],
            "chore": [
                "clean the floor",
                "wash the dishes",
                "open the windows",
                "water the plants",
                "make the bed",
                "take out the rubbish",
                "do the laundry",
            ],
            "day": ["every morning", "every evening", "once a week", "on Sunday", "after dinner"],
        },
        [
            "We {chore} {day}.",
            "The {room} is clean and bright.",
            "It is good to {chore} {day}.",
            "Plants in the {room} need light and water.",
            "Keep the {room} tidy and warm.",
            "A small garden can grow tomatoes, herbs and flowers.",
        ],
    ),
    "health": (
        {
            "habit": [
                "sleep eight hours",
                "drink enough water",
                "eat fruit and vegetables",
                "walk every day",
                "rest when you are tired",
                "wash your hands",
            ],
            "why": ["stay healthy", "feel better", "have more energy", "stay strong"],
        },
        [
            "It is good to {habit}.",
            "People who {habit} {why}.",
            "Try to {habit} to {why}.",
            "A doctor can help when you feel ill.",
            "Exercise helps you {why}.",
        ],
    ),
    "travel": (
        {
            "way": ["by train", "by bus", "by car", "by plane", "on foot", "by bike"],
            "thing": ["a ticket", "a map", "your passport", "some water", "a small bag"],
            "place": ["the city", "the sea", "the mountains", "the village", "the station"],
        },
        [
            "You can travel to {place} {way}.",
            "Before a trip, pack {thing}.",
            "Bring {thing} when you go to {place}.",
            "Going {way} to {place} takes about an hour.",
            "Many people visit {place} in summer.",
        ],
    ),
}


def everyday_document(rng: random.Random) -> str:
    """A few statements on one everyday topic."""
    slots, templates = EVERYDAY[rng.choice(sorted(EVERYDAY))]
    picks = [
        rng.choice(templates).format(**{k: rng.choice(v) for k, v in slots.items()}) for _ in range(rng.randint(2, 4))
    ]
    return " ".join(cap(s) for s in picks)


def make_pretrain_corpus(n: int, seed: int, everyday: float) -> list[str]:
    """`n` documents; a share `everyday` of them on everyday topics, the rest on the countries."""
    rng = random.Random(seed)
    return [everyday_document(rng) if rng.random() < everyday else pretrain_document(rng) for _ in range(n)]


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------
SPECIAL = {"unk": "<unk>", "bos": "<s>", "eos": "</s>", "pad": "<pad>"}

# Llama-2 chat format: <s>[INST] {user} [/INST] {assistant} </s>; an optional system
# message goes inside the first [INST] block between <<SYS>> markers.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set messages = messages[1:] %}"
    "{% else %}{% set system = none %}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{% set content = message['content'] %}"
    "{% if loop.first and system %}"
    "{% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + content %}"
    "{% endif %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'].strip() + ' ' + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
)


def build_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [SPECIAL["unk"], SPECIAL["bos"], SPECIAL["eos"], SPECIAL["pad"]]  # ids 0..3
    tok = Tokenizer(models.BPE(unk_token=SPECIAL["unk"]))
    # GPT-2's scheme: every byte is a base token, so no text is ever <unk>; a space
    # belongs to the word after it, and decoding gives back the exact text.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # No subword prefix: the trainer then breaks ties between merges by token id, which
    # is fixed by the sorted byte alphabet, so the vocabulary is the same on every run.
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # The chat markers are single (non-special) tokens, so they survive decoding.
    tok.add_tokens(["[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"])
    # Like Llama: encode() prepends <s> (add_special_tokens=False leaves it out).
    bos_id = tok.token_to_id(SPECIAL["bos"])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SPECIAL['bos']} $A",
        pair=f"{SPECIAL['bos']} $A {SPECIAL['bos']} $B",
        special_tokens=[(SPECIAL["bos"], bos_id)],
    )

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"],
        unk_token=SPECIAL["unk"],
        pad_token=SPECIAL["pad"],
        model_max_length=512,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


# --------------------------------------------------------------------------------------
# Model pre-training
# --------------------------------------------------------------------------------------
def build_model(tokenizer, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.02,
    )
    return LlamaForCausalLM(config)


def pack(tokenizer, corpus: list[str], block: int):
    """`<s> doc </s>` for every document, concatenated and cut into rows of `block` tokens."""
    import torch

    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    flat = []
    # A leading space, so that a document's first word is the same token as it is inside a
    # sentence or after "[INST]" ("ĠItaly", not "Italy"): what is learnt about it is shared.
    for ids in tokenizer([" " + doc for doc in corpus], add_special_tokens=False)["input_ids"]:
        flat += [bos] + ids + [eos]
    n = len(flat) // block
    return torch.tensor(flat[: n * block], dtype=torch.long).view(n, block)


def pretrain(model, tokenizer, corpus: list[str], args) -> None:
    import torch

    rows = pack(tokenizer, corpus, args.block)
    print(f"pre-training corpus: {len(corpus)} documents, {rows.numel()} tokens, {len(rows)} rows of {args.block}")

    gen = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)

    def lr_at(step: int) -> float:  # linear warmup, cosine decay to 10%
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    t0 = time.time()
    order, pos = torch.randperm(len(rows), generator=gen), 0
    for step in range(args.steps):
        if pos + args.batch > len(order):
            order, pos = torch.randperm(len(rows), generator=gen), 0
        batch = rows[order[pos : pos + args.batch]]
        pos += args.batch
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  lr {lr_at(step):.2e}  {time.time() - t0:6.1f}s", flush=True)
    model.eval()


def fact_accuracy(model, tokenizer) -> dict:
    """Greedy completion of 'The capital of X is', 'X is in', 'People in X speak'."""
    import torch

    probes = {
        "capital": ("The capital of {c} is", "{k}."),
        "continent": ("{C} is in", "{o}."),
        "language": ("People in {c} speak", "{l}."),
    }
    scores = {}
    for kind, (prompt, want) in probes.items():
        hits = 0
        for c, k, o, lang in COUNTRIES:
            facts = {"c": c, "C": cap(c), "k": k, "o": o, "l": lang}
            ids = tokenizer(" " + prompt.format(**facts), return_tensors="pt")["input_ids"]
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=6,
                    do_sample=False,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
            got = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
            hits += got.startswith(want.format(**facts))
        scores[kind] = hits / len(COUNTRIES)
    return scores


# --------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------
README = """# tiny-llama

A tiny Llama-architecture causal LM ({params:,} parameters, {size_mb:.1f} MB of fp32
safetensors) shipped so that the project's default LoRA job runs on CPU, offline, in
seconds. It is **not** a general language model: it knows a table of {n_countries}
countries (capital, continent, language) and a little everyday English (cooking, pets,
weather, home, health, travel), from plain statements.

* Architecture: `LlamaForCausalLM`, hidden {hidden}, {layers} layers, {heads} heads, MLP
  {intermediate}, tied input/output embeddings, vocab {vocab}, fp32.
* Tokenizer: byte-level BPE (built with the `tokenizers` library): the 256 bytes plus
  merges learnt on the corpus, so any UTF-8 text tokenizes with no unknown token; loads
  with `AutoTokenizer.from_pretrained` as a fast tokenizer. Special tokens: `<s>` (bos,
  added by `encode()` like Llama's; `add_special_tokens=False` leaves it out), `</s>`
  (eos), `<unk>` (never produced), `<pad>`. `[INST]` and `[/INST]` are single tokens.
  The chat template is Llama-2's: `<s>[INST] {{user}} [/INST] {{assistant}} </s>`.
* Pre-training: {steps} steps of plain next-token prediction (batch {batch} x {block}
  tokens) on {corpus:,} generated paragraphs of statements such as "The capital of Italy
  is Rome. It is in Europe." or "To cook rice, heat it in a pot for twenty minutes."
  ({everyday:.0%} of them on everyday topics). It never saw a question nor the `[INST]`
  format: answering the questions of `conf/assets/demo/train.jsonl` ("Where is Italy?" ->
  "Italy is in Europe.") is what the LoRA fine-tune teaches. Greedy completions of the
  facts by the base model: {scores}.

Made by `tools/make_demo_assets.py` (deterministic, seeded; rerun with
`python tools/make_demo_assets.py`, a few minutes on 2 CPU cores). Check the default job's
bar with `python tools/check_demo_bar.py`.
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ASSETS, help="assets directory")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--corpus-size", type=int, default=30000, help="pre-training paragraphs")
    p.add_argument("--everyday", type=float, default=0.3, help="share of pre-training paragraphs on everyday topics")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--block", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)

    demo = make_demo_dataset(args.seed)
    corpus = make_pretrain_corpus(args.corpus_size, args.seed + 1, args.everyday)
    # The tokenizer sees the demo text too, so the question words are whole tokens.
    tokenizer = build_tokenizer(corpus + [f" {d['instruction']} {d['output']}" for d in demo], args.vocab_size)
    print(f"tokenizer: {len(tokenizer)} tokens")

    model = build_model(tokenizer, args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters")
    pretrain(model, tokenizer, corpus, args)
    scores = fact_accuracy(model, tokenizer)
    scores_text = ", ".join(f"{k} {v:.0%}" for k, v in scores.items())
    print(f"greedy fact completions of the base model: {scores_text}")

    demo_dir = args.out / "demo"
    demo_dir.mkdir(parents=True, exist_ok=True)
    with open(demo_dir / "train.jsonl", "w") as f:
        for d in demo:
            f.write(json.dumps(d) + "\n")

    model_dir = args.out / "tiny-llama"
    model_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    size_mb = (model_dir / "model.safetensors").stat().st_size / 1e6
    (model_dir / "README.md").write_text(
        README.format(
            params=n_params,
            size_mb=size_mb,
            n_countries=len(COUNTRIES),
            hidden=args.hidden,
            layers=args.layers,
            heads=args.heads,
            intermediate=args.intermediate,
            vocab=len(tokenizer),
            steps=args.steps,
            batch=args.batch,
            block=args.block,
            corpus=len(corpus),
            everyday=args.everyday,
            scores=scores_text,
        )
    )

    # What the training loop does: load both back, offline.
    tok2 = AutoTokenizer.from_pretrained(model_dir)
    model2 = AutoModelForCausalLM.from_pretrained(model_dir)
    assert tok2.is_fast and tok2.pad_token == SPECIAL["pad"] and tok2.chat_template
    assert sum(p.numel() for p in model2.parameters()) == n_params
    print(f"wrote {demo_dir / 'train.jsonl'} ({len(demo)} examples) and {model_dir} ({size_mb:.1f} MB safetensors)")


if __name__ == "__main__":
    main()
