"""Character vocabulary, text normalisation, and the GigaSpeech transcript rules.

The model emits 29 symbols: CTC blank, space, apostrophe, a-z. Every transcript is normalised to
that alphabet before training; `gigaspeech_scoring` is the official GigaSpeech scoring transform
(SpeechColab `utils/gigaspeech_scoring.py`), applied to reference and hypothesis alike.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections.abc import Sequence

from num2words import num2words

VOCAB: tuple[str, ...] = ("<blank>", " ", "'", *string.ascii_lowercase)
BLANK = 0
_CHAR_TO_ID = {ch: i for i, ch in enumerate(VOCAB) if i != BLANK}

# --- normalisation ---------------------------------------------------------------------------

_ORDINAL = re.compile(r"(\d+)(st|nd|rd|th)\b", re.IGNORECASE)
_DECIMAL = re.compile(r"\d+\.\d+")
_INTEGER = re.compile(r"\d+")
_THOUSANDS_SEP = re.compile(r"(?<=\d),(?=\d{3}\b)")
_NOT_ALPHABET = re.compile(r"[^a-z' ]+")
_STRAY_APOSTROPHE = re.compile(r"(?<![a-z])'+(?![a-z])")
_APOSTROPHE_RUN = re.compile(r"''+")
_SINGLE_QUOTED = re.compile(r"(?<![a-z'])'([a-z][a-z']*)'(?![a-z'])")
_SPACES = re.compile(r" +")
_SYMBOL_WORDS = {"%": " percent ", "&": " and ", "+": " plus ", "@": " at "}
_QUOTE_LIKE = str.maketrans({"\u2018": "'", "\u2019": "'", "\u02bc": "'", "`": "'"})


def _spell_numbers(text: str) -> str:
    text = _THOUSANDS_SEP.sub("", text)
    text = _ORDINAL.sub(lambda m: f" {num2words(int(m.group(1)), to='ordinal')} ", text)
    text = _DECIMAL.sub(lambda m: f" {num2words(float(m.group(0)))} ", text)
    return _INTEGER.sub(lambda m: f" {_spell_integer(m.group(0))} ", text)


def _spell_integer(digits: str) -> str:
    # A bare four-digit number from 1100 to 2099 is most likely a year: "nineteen ninety".
    value = int(digits)
    is_year = len(digits) == 4 and 1100 <= value <= 2099
    return num2words(value, to="year") if is_year else num2words(value)


def normalize(text: str) -> str:
    """Lower-case `text`, spell out numbers, and keep only [a-z' ] with single spaces.

    Accents are stripped ("café" -> "cafe"), "-" and other punctuation become word breaks,
    apostrophes survive only when attached to a letter ("don't", "students'"), single quotes
    around a word are dropped ("'quote'" -> "quote").
    """
    text = unicodedata.normalize("NFKD", text.translate(_QUOTE_LIKE))
    text = "".join(ch for ch in text if not unicodedata.combining(ch))
    for symbol, words in _SYMBOL_WORDS.items():
        text = text.replace(symbol, words)
    text = _spell_numbers(text).lower()
    text = _NOT_ALPHABET.sub(" ", text)
    text = _APOSTROPHE_RUN.sub("'", text)
    text = _SINGLE_QUOTED.sub(r"\1", text)
    text = _STRAY_APOSTROPHE.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


def encode(text: str) -> list[int]:
    """Token ids of an already normalised `text`; ValueError names the first bad character."""
    try:
        return [_CHAR_TO_ID[ch] for ch in text]
    except KeyError as err:
        raise ValueError(
            f"character {err.args[0]!r} is not in the alphabet [a-z' ] (text: {text!r})"
        ) from None


def decode(ids: Sequence[int]) -> str:
    """Text of token `ids`; blanks are dropped (CTC repeat collapsing is the decoder's job)."""
    chars = []
    for i in ids:
        i = int(i)
        if not 0 <= i < len(VOCAB):
            raise ValueError(f"token id {i} is outside the vocabulary (0..{len(VOCAB) - 1})")
        if i != BLANK:
            chars.append(VOCAB[i])
    return "".join(chars)


# --- GigaSpeech ------------------------------------------------------------------------------

GIGASPEECH_FILLERS = frozenset(
    ["UH", "UHH", "UM", "EH", "MM", "HM", "AH", "HUH", "HA", "ER", "OOF", "HEE", "ACH", "EEE", "EW"]
)
GIGASPEECH_UNK = frozenset(["<UNK>", "<unk>"])
GIGASPEECH_PUNCTUATION = frozenset(["<COMMA>", "<PERIOD>", "<QUESTIONMARK>", "<EXCLAMATIONPOINT>"])
GIGASPEECH_GARBAGE = frozenset(["<SIL>", "<NOISE>", "<MUSIC>", "<OTHER>"])
_NON_SCORING = GIGASPEECH_FILLERS | GIGASPEECH_UNK | GIGASPEECH_PUNCTUATION | GIGASPEECH_GARBAGE


def gigaspeech_train_text(raw: str) -> str | None:
    """Training transcript of a raw GigaSpeech transcript, or None for a garbage utterance.

    Utterances tagged <SIL> <NOISE> <MUSIC> <OTHER> are discarded (as Kaldi's data prep does).
    Punctuation and <UNK> tags are removed; fillers stay, because they are spoken (scoring drops
    them from both sides). The rest is normalised like any transcript.
    """
    words = raw.split()
    if any(word.upper() in GIGASPEECH_GARBAGE for word in words):
        return None
    kept = [w for w in words if w.upper() not in GIGASPEECH_PUNCTUATION | GIGASPEECH_UNK]
    return normalize(" ".join(kept))


def gigaspeech_scoring(text: str) -> str:
    """The official GigaSpeech scoring transform: upper-case, "-" to space, drop non-scoring words.

    Non-scoring words: conversational fillers, <UNK>/<unk>, punctuation tags and garbage tags.
    """
    words = text.upper().replace("-", " ").split()
    return " ".join(w for w in words if w not in _NON_SCORING)
