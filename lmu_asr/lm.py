"""A word lexicon and a bigram language model (ARPA, absolute discounting with back-off) built from
training transcripts, for lexicon-constrained CTC beam search (decode.BeamSearchDecoder).

    python -m lmu_asr.lm OUT_DIR TRAIN.jsonl [MORE.jsonl ...]   # lexicon.txt, words.arpa
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

DISCOUNT = 0.75
BOS, EOS, UNK = "<s>", "</s>", "<unk>"


def write_lexicon(words: Iterable[str], path: Path) -> None:
    """One line per word: the word, then its spelling with the word separator `|`."""
    lines = [f"{w}\t{' '.join(w)} |" for w in sorted(set(words))]
    path.write_text("\n".join(lines) + "\n")


def bigram_arpa(sentences: list[list[str]]) -> str:
    """ARPA text of a bigram LM: absolute discounting, back-off to a discounted unigram."""
    uni: Counter[str] = Counter()
    bi: Counter[tuple[str, str]] = Counter()
    for words in sentences:
        seq = [BOS, *words, EOS]
        uni.update(seq[1:])
        bi.update(zip(seq, seq[1:]))
    n_tokens = sum(uni.values())
    # unigram: reserve a little mass for <unk>
    p_uni = {w: c / (n_tokens + 1) for w, c in uni.items()}
    p_uni[UNK] = 1 / (n_tokens + 1)
    history: Counter[str] = Counter()  # c(v)
    followers: Counter[str] = Counter()  # distinct w after v
    seen_mass: Counter[str] = Counter()  # unigram mass of the words seen after v
    for (v, w), c in bi.items():
        history[v] += c
        followers[v] += 1
        seen_mass[v] += p_uni[w]
    p_bi = {(v, w): (c - DISCOUNT) / history[v] for (v, w), c in bi.items()}
    # the discounted mass of v goes to the unigrams of the words not seen after v
    backoff = {
        v: (DISCOUNT * followers[v] / history[v]) / max(1 - seen_mass[v], 1e-9) for v in history
    }

    def lg(p: float) -> str:
        return f"{math.log10(p):.6f}"

    vocab = sorted(p_uni) + [BOS]
    lines = ["", "\\data\\", f"ngram 1={len(vocab)}", f"ngram 2={len(p_bi)}", "", "\\1-grams:"]
    for w in vocab:
        prob = "-99" if w == BOS else lg(p_uni[w])
        bow = f"\t{lg(backoff[w])}" if w in backoff else ""
        lines.append(f"{prob}\t{w}{bow}")
    lines += ["", "\\2-grams:"]
    lines += [f"{lg(p)}\t{v} {w}" for (v, w), p in sorted(p_bi.items())]
    return "\n".join(lines + ["", "\\end\\", ""])


def build_lm(texts: Iterable[str], out_dir: Path) -> tuple[Path, Path]:
    """Lexicon and bigram ARPA from transcripts (already normalised) -> (lexicon, arpa) paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sentences = [t.split() for t in texts if t.split()]
    if not sentences:
        raise ValueError("cannot build a language model from no transcripts")
    lexicon, arpa = out_dir / "lexicon.txt", out_dir / "words.arpa"
    write_lexicon((w for s in sentences for w in s), lexicon)
    arpa.write_text(bigram_arpa(sentences))
    return lexicon, arpa


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) < 2:
        sys.exit(__doc__)
    texts = [
        json.loads(line)["text"]
        for manifest in args[1:]
        for line in Path(manifest).read_text().splitlines()
        if line.strip()
    ]
    for path in build_lm(texts, Path(args[0])):
        print(path)


if __name__ == "__main__":
    main()
