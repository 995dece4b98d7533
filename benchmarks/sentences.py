"""Deterministic English-like sentences for the embedding benchmark: short (3-12 words) and
long (40-120 words) mixed, drawn by a seeded RNG from a small grammar over our own word list.

    from benchmarks.sentences import mixed_sentences, short_sentences
    mixed_sentences(2000)        # the same 2,000 every time: ~70% short, ~30% long, shuffled
    short_sentences(100, seed=1) # short ones only (the latency probe)

Clauses follow "the <adjective> <noun> <verb> <preposition> the <noun>"-like templates, so a
WordPiece tokenizer sees ordinary words (about 1.2 tokens per word for all-MiniLM).
"""
from __future__ import annotations

import random

NOUNS = """
river garden window teacher engine kitchen market village harbor mountain forest library
student doctor farmer painter sailor pilot driver singer writer baker child neighbor friend
city street bridge tower station museum school office factory hospital island desert valley
ocean lake cloud storm winter summer morning evening night letter story song picture camera
computer phone server network program model signal battery motor wheel road train plane ship
bicycle door table chair lamp clock mirror bottle basket blanket coffee bread apple orange
garden path meadow field hill stone river bank shop theater concert game team coach player
question answer problem idea plan report meeting lesson book paper pencil map ticket journey
""".split()
VERBS = """
watches follows carries finds builds repairs paints visits opens closes crosses reaches
leaves joins helps answers writes reads sends receives measures explains remembers describes
moves pushes pulls lifts drops holds shares checks counts collects cleans fixes tests starts
""".split()
INTRANSITIVE = """
waits sleeps rests listens smiles arrives returns works travels sings laughs wanders hurries
""".split()
ADJECTIVES = """
quiet bright old young small large busy empty warm cold green blue red heavy light quick slow
careful gentle strong tired happy curious distant narrow wide clean broken new early late
simple clever patient honest friendly ancient modern wooden silver golden rainy sunny windy
""".split()
ADVERBS = """
slowly quickly quietly carefully often rarely always sometimes gladly calmly easily eagerly
""".split()
PREPOSITIONS = "near behind beside across under over through along toward past inside around".split()
DETERMINERS = "the a this that every one another each some".split()
CONNECTORS = ["and", "but", "while", "because", "so", "although", "after", "before", "when"]
TIMES = """
today yesterday tonight tomorrow again later soon afterwards meanwhile
""".split()


def _noun_phrase(rng: random.Random) -> list[str]:
    words = [rng.choice(DETERMINERS)]
    if rng.random() < 0.6:
        words.append(rng.choice(ADJECTIVES))
    return words + [rng.choice(NOUNS)]


def _clause(rng: random.Random) -> list[str]:
    """One clause: subject, verb, and some of object / place / manner / time."""
    words = _noun_phrase(rng)
    if rng.random() < 0.25:
        words.append(rng.choice(ADVERBS))
    if rng.random() < 0.7:
        words += [rng.choice(VERBS)] + _noun_phrase(rng)
    else:
        words.append(rng.choice(INTRANSITIVE))
    if rng.random() < 0.6:
        words += [rng.choice(PREPOSITIONS)] + _noun_phrase(rng)
    if rng.random() < 0.3:
        words.append(rng.choice(TIMES))
    return words


def sentence(rng: random.Random, num_words: int) -> str:
    """Clauses joined by connectors, cut to exactly num_words words, capitalized, with a period."""
    words = _clause(rng)
    while len(words) < num_words:
        words[-1] += ","
        words += [rng.choice(CONNECTORS)] + _clause(rng)
    words = words[:num_words]
    words[-1] = words[-1].rstrip(",")
    return " ".join(words).capitalize() + "."


def mixed_sentences(num: int = 2000, seed: int = 0, long_fraction: float = 0.3,
                    short_words: tuple[int, int] = (3, 12),
                    long_words: tuple[int, int] = (40, 120)) -> list[str]:
    """`num` sentences, round(num * long_fraction) of them long, in a seeded shuffled order."""
    rng = random.Random(seed)
    num_long = round(num * long_fraction)
    kinds = [True] * num_long + [False] * (num - num_long)
    rng.shuffle(kinds)
    return [sentence(rng, rng.randint(*(long_words if is_long else short_words))) for is_long in kinds]


def short_sentences(num: int, seed: int = 1, words: tuple[int, int] = (3, 12)) -> list[str]:
    rng = random.Random(seed)
    return [sentence(rng, rng.randint(*words)) for _ in range(num)]


def is_long(text: str, threshold: int = 40) -> bool:
    return len(text.split()) >= threshold


if __name__ == "__main__":
    texts = mixed_sentences()
    num_long = sum(map(is_long, texts))
    print(f"{len(texts)} sentences, {num_long} long, {len(texts) - num_long} short; the first three:")
    for text in texts[:3]:
        print(" ", text)
