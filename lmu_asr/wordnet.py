"""Sentences for the built-in corpus: WordNet 3.0 gloss examples (Debian `wordnet-base`).

The quoted examples after `|` in /usr/share/wordnet/data.{noun,verb,adj,adv}, filtered to those a
TTS voice reads the same way as their normalised transcript, then split into disjoint ranges.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from pathlib import Path

from lmu_asr.text import normalize

WORDNET_DIR = Path("/usr/share/wordnet")

_ALLOWED_CHARS = re.compile(r"[A-Za-z0-9 ,.;:!?'-]+")
_ACRONYM = re.compile(r"[A-Z][A-Za-z]*[A-Z]")  # NATO, TV, McCarthy
_INNER_DOT = re.compile(r"\.(?!\d)|(?<!\d)\.")  # e.g., Mr., J. Smith, ellipses; not 3.5
_NUMBER_TOKEN = re.compile(r"\d[\d,]*(\.\d+)?(st|nd|rd|th)?")


def _usable(sentence: str) -> bool:
    """False for sentences with odd characters, abbreviations, acronyms or numbers glued to
    letters ("1990s"), which TTS would read differently from their normalised transcript."""
    if not _ALLOWED_CHARS.fullmatch(sentence) or _ACRONYM.search(sentence):
        return False
    if _INNER_DOT.search(sentence.rstrip(" .!?")):
        return False
    words = [w.strip(",;:!?.'") for w in sentence.split()]
    return all(_NUMBER_TOKEN.fullmatch(w) for w in words if any(c.isdigit() for c in w))


def wordnet_sentences(wordnet_dir: Path = WORDNET_DIR) -> list[str]:
    """Normalised, de-duplicated WordNet 3.0 gloss examples of 4-20 words, in file order."""
    seen: dict[str, None] = {}
    for pos in ("noun", "verb", "adj", "adv"):
        path = wordnet_dir / f"data.{pos}"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: apt-get install wordnet-base")
        for line in path.read_text(encoding="latin-1").splitlines():
            if line.startswith("  ") or " | " not in line:
                continue  # licence header, or no gloss
            for quoted in re.findall(r'"([^"]+)"', line.split(" | ", 1)[1]):
                quoted = quoted.strip()
                text = normalize(quoted) if _usable(quoted) else ""
                if 4 <= len(text.split()) <= 20:
                    seen.setdefault(text, None)
    return list(seen)


def wordnet_licence(wordnet_dir: Path = WORDNET_DIR) -> str:
    """The WordNet 3.0 licence, as printed at the top of its data files."""
    header = []
    for line in (wordnet_dir / "data.adv").read_text(encoding="latin-1").splitlines():
        if not line.startswith("  "):
            break
        header.append(line.strip().split(" ", 1)[1].rstrip() if " " in line.strip() else "")
    return "\n".join(header) + "\n"


UNSEEN_POOL = 2000  # the last sentences of the permutation: only for the unseen-voices split


def split_sentences(
    sentences: Sequence[str],
    n_train: int,
    n_dev: int,
    n_test: int,
    seed: int,
    n_unseen: int = 0,
    unseen_pool: int = UNSEEN_POOL,
) -> dict[str, list[str]]:
    """Disjoint test/dev/train/unseen ranges of a seeded permutation; train cycles if it runs
    short. The unseen split draws from the last `unseen_pool` sentences, which no other split uses,
    so its sentences do not depend on the other sizes (nor theirs on it)."""
    order = list(sentences)
    random.Random(f"lmu_asr-split:{seed}").shuffle(order)
    if n_unseen > unseen_pool:
        raise ValueError(f"n_unseen = {n_unseen}: at most {unseen_pool} unseen-split sentences")
    pool, order = order[len(order) - unseen_pool :], order[: len(order) - unseen_pool]
    if n_dev + n_test + min(n_train, 1) > len(order):
        raise ValueError(f"n_dev + n_test = {n_dev + n_test} leaves no WordNet sentences to train")
    rest = order[n_test + n_dev :]
    train = [rest[i % len(rest)] for i in range(n_train)]
    splits = {"test": order[:n_test], "dev": order[n_test : n_test + n_dev], "train": train}
    return splits | {"unseen": pool[:n_unseen]}
