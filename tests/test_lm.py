import math

import pytest
import torch

from lmu_asr.decode import BeamConfig, BeamSearchDecoder
from lmu_asr.lm import BOS, EOS, build_lm
from tests.test_decode import one_hot_path

TEXTS = ["go left now", "go right now", "turn left", "stop", "go left"]


def read_arpa(path):
    """{order: {ngram tuple: (log10 p, log10 backoff)}} from an ARPA file."""
    grams, order = {}, None
    for line in path.read_text().splitlines():
        if line.endswith("-grams:"):
            order = int(line[1])
            grams[order] = {}
        elif order and line and not line.startswith("\\"):
            parts = line.split("\t")
            words = tuple(parts[1].split())
            grams[order][words] = (float(parts[0]), float(parts[2]) if len(parts) > 2 else 0.0)
    return grams


def prob(grams, history, word):
    if (history, word) in grams[2]:
        return 10 ** grams[2][(history, word)][0]
    return 10 ** (grams[1][(history,)][1] + grams[1][(word,)][0])


def test_bigram_lm_is_a_distribution_for_every_history(tmp_path):
    lexicon, arpa = build_lm(TEXTS, tmp_path)
    grams = read_arpa(arpa)
    words = [w for (w,) in grams[1] if w != BOS]
    assert math.isclose(sum(10 ** grams[1][(w,)][0] for w in words), 1.0, rel_tol=1e-4)
    for history in ("go", "left", BOS):
        total = sum(prob(grams, history, w) for w in words)
        assert math.isclose(total, 1.0, rel_tol=1e-4), history
    # seen continuations beat unseen ones
    assert prob(grams, "go", "left") > prob(grams, "go", "stop")
    assert prob(grams, "stop", EOS) > prob(grams, "stop", "left")
    lines = lexicon.read_text().splitlines()
    assert "left\tl e f t |" in lines and len(lines) == 6


def test_lexicon_decoding_emits_only_known_words(tmp_path):
    lexicon, arpa = build_lm(TEXTS, tmp_path)
    decode = BeamSearchDecoder(BeamConfig(beam_size=16, lexicon=str(lexicon), lm=str(arpa)))
    # "go lefd": the misspelt word is pulled to the lexicon's "left"
    lp = one_hot_path(list("_g_o_ _l_e_f_d_"))
    assert decode(lp, torch.tensor([lp.shape[1]])) == ["go left"]


def test_no_transcripts_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no transcripts"):
        build_lm(["", "  "], tmp_path)
