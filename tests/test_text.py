import re

import pytest

from lmu_asr.text import (
    BLANK,
    VOCAB,
    decode,
    encode,
    gigaspeech_scoring,
    gigaspeech_train_text,
    normalize,
)


def test_vocab_is_blank_space_apostrophe_and_letters():
    assert len(VOCAB) == 29
    assert VOCAB[BLANK] == "<blank>" and BLANK == 0
    assert VOCAB[1:3] == (" ", "'")
    assert "".join(VOCAB[3:]) == "abcdefghijklmnopqrstuvwxyz"


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Hello,   World!", "hello world"),
        ("state-of-the-art", "state of the art"),
        ("I have 3 cats", "i have three cats"),
        ("21 guns", "twenty one guns"),
        ("the 21st century", "the twenty first century"),
        ("in 1896", "in eighteen ninety six"),
        ("1,000 people", "one thousand people"),
        ("3.5 points", "three point five points"),
        ("10% & more", "ten percent and more"),
        ("don't stop", "don't stop"),
        ("the students' books", "the students' books"),
        ("\u2018quoted\u2019 word", "quoted word"),
        ("caf\u00e9 na\u00efve", "cafe naive"),
        ('and/or (maybe) "so"', "and or maybe so"),
        ("  ' lonely  apostrophe '  ", "lonely apostrophe"),
        ("", ""),
    ],
)
def test_normalize(raw, expected):
    assert normalize(raw) == expected


def test_normalize_output_only_has_alphabet_characters():
    messy = "Ünïcödé — #tags @home 42nd; 7/8 ≈ 0.875!? «quotes» \t\n tabs"
    assert re.fullmatch(r"[a-z' ]*", normalize(messy))
    assert "  " not in normalize(messy)


def test_encode_decode_round_trip():
    text = "it's a test"
    ids = encode(text)
    assert all(0 < i < len(VOCAB) for i in ids)
    assert decode(ids) == text


def test_encode_names_the_bad_character_and_text():
    with pytest.raises(ValueError, match=r"'!'.*'hi!'"):
        encode("hi!")
    with pytest.raises(ValueError, match="'H'"):
        encode("Hi")


def test_decode_drops_blanks_and_rejects_unknown_ids():
    assert decode([BLANK, encode("a")[0], BLANK, encode("b")[0]]) == "ab"
    with pytest.raises(ValueError, match="29"):
        decode([29])


# --- GigaSpeech ------------------------------------------------------------------------------


def test_gigaspeech_train_text_removes_punctuation_tags_and_normalises():
    raw = "AS THEY'RE LEAVING <COMMA> CAN KASH PULL ZAHRA ASIDE REALLY QUICKLY <QUESTIONMARK>"
    assert (
        gigaspeech_train_text(raw) == "as they're leaving can kash pull zahra aside really quickly"
    )
    raw = "WOW <EXCLAMATIONPOINT> IT WORKED <PERIOD>"
    assert gigaspeech_train_text(raw) == "wow it worked"


@pytest.mark.parametrize("tag", ["<SIL>", "<NOISE>", "<MUSIC>", "<OTHER>"])
def test_gigaspeech_train_text_drops_garbage_utterances(tag):
    assert gigaspeech_train_text(tag) is None
    assert gigaspeech_train_text(f"SOME WORDS {tag} MORE") is None


def test_gigaspeech_train_text_drops_unk_keeps_fillers_and_splits_hyphens():
    assert gigaspeech_train_text("UH I SAW <UNK> A T-SHIRT <unk>") == "uh i saw a t shirt"


def test_gigaspeech_scoring_is_the_official_transform():
    ref = "UH I MEAN <COMMA> IT'S STATE-OF-THE-ART <UNK> UM <PERIOD>"
    assert gigaspeech_scoring(ref) == "I MEAN IT'S STATE OF THE ART"
    # the model's lower-case output is upper-cased, so both sides compare equal
    assert gigaspeech_scoring("uh i mean it's state of the art") == "I MEAN IT'S STATE OF THE ART"


@pytest.mark.parametrize(
    "word",
    [
        "UH",
        "UHH",
        "UM",
        "EH",
        "MM",
        "HM",
        "AH",
        "HUH",
        "HA",
        "ER",
        "OOF",
        "HEE",
        "ACH",
        "EEE",
        "EW",
        "<UNK>",
        "<unk>",
        "<COMMA>",
        "<PERIOD>",
        "<QUESTIONMARK>",
        "<EXCLAMATIONPOINT>",
        "<SIL>",
        "<NOISE>",
        "<MUSIC>",
        "<OTHER>",
    ],
)
def test_gigaspeech_scoring_drops_every_non_scoring_word(word):
    assert gigaspeech_scoring(f"HELLO {word} THERE") == "HELLO THERE"
    assert gigaspeech_scoring(word.lower()) == ""


def test_gigaspeech_scoring_keeps_other_words_and_is_idempotent():
    text = "HUHS UMBRELLA ERR  AHEAD"  # fillers only drop as whole words
    assert gigaspeech_scoring(text) == "HUHS UMBRELLA ERR AHEAD"
    assert gigaspeech_scoring(gigaspeech_scoring(text)) == gigaspeech_scoring(text)
