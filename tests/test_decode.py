import shutil
import subprocess

import pytest
import soundfile as sf
import torch
import torch.nn.functional as F
import torchaudio

from lmu_asr.decode import BeamConfig, BeamSearchDecoder, error_rates, greedy_decode
from lmu_asr.features import FeatureConfig
from lmu_asr.model import SpeechRecognizer
from lmu_asr.text import BLANK, VOCAB, encode
from tests.test_model import preset


def one_hot_path(text_path: list[str]) -> torch.Tensor:
    """(1, T, V) log-probs that put almost all mass on the given symbol per frame."""
    ids = [BLANK if s == "_" else VOCAB.index(s) for s in text_path]
    logits = torch.full((1, len(ids), len(VOCAB)), -10.0)
    logits[0, torch.arange(len(ids)), torch.tensor(ids)] = 10.0
    return logits.log_softmax(-1)


def test_greedy_merges_repeats_and_drops_blanks():
    lp = one_hot_path(list("_hh_e_ll_l_o  __w") + ["_"])
    assert greedy_decode(lp, torch.tensor([lp.shape[1]])) == ["hello w"]
    # only the first `length` frames count
    assert greedy_decode(lp, torch.tensor([5])) == ["he"]


def test_beam_agrees_with_greedy_on_peaked_outputs():
    lp = one_hot_path(list("_the__ cat_s'_"))
    decoder = BeamSearchDecoder(BeamConfig(beam_size=8))
    assert decoder(lp, torch.tensor([lp.shape[1]])) == ["the cats'"]


def test_beam_config_validation():
    with pytest.raises(ValueError, match="beam_size"):
        BeamConfig(beam_size=0)
    with pytest.raises(ValueError, match="lexicon"):
        BeamConfig(lm="x.arpa")
    with pytest.raises(ValueError, match="not found"):
        BeamConfig(lexicon="/nonexistent/lexicon.txt")


def test_error_rates_counts():
    r = error_rates(["the cat sat", "a b"], ["the bat sat down", "a b"])
    # words: 1 substitution + 1 insertion over 5 reference words
    assert r["word_errors"] == 2 and r["words"] == 5
    assert r["wer"] == pytest.approx(2 / 5)
    # chars: "the cat sat" -> "the bat sat down": 1 sub + 5 ins; "a b" exact
    assert r["char_errors"] == 6 and r["chars"] == 11 + 3
    # an empty reference counts the hypothesis words as insertions
    e = error_rates([""], ["uh oh"])
    assert e["word_errors"] == 2 and e["words"] == 0
    # the transform applies to both sides
    t = error_rates(["UM hello"], ["hello"], transform=lambda s: s.replace("UM", ""))
    assert t["wer"] == 0.0


PHRASES = ["yes", "no", "go left", "turn right", "stop now", "one two", "red car", "blue sky"]


@pytest.fixture(scope="module")
def spoken_phrases(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.fail("espeak-ng is missing: run scripts/setup.sh (it installs the TTS engines)")
    out = tmp_path_factory.mktemp("phrases")
    wavs = []
    for i, text in enumerate(PHRASES):
        path = out / f"{i}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), text], check=True)
        wav, sr = sf.read(path, dtype="float32")
        wavs.append(torchaudio.functional.resample(torch.from_numpy(wav), sr, 16000))
    return wavs


@pytest.mark.slow
def test_tiny_model_learns_to_transcribe_a_fixed_batch(spoken_phrases):
    """lmu_tiny trained a few hundred steps on 8 short phrases decodes all 8 exactly."""
    torch.manual_seed(0)
    features = FeatureConfig(normalize="utterance", freq_masks=0, time_masks=0)
    model = SpeechRecognizer(preset("lmu_tiny"), features)
    wav_lens = torch.tensor([len(w) for w in spoken_phrases])
    wav = torch.nn.utils.rnn.pad_sequence(spoken_phrases, batch_first=True)
    targets = [torch.tensor(encode(t)) for t in PHRASES]
    tokens = torch.nn.utils.rnn.pad_sequence(targets, batch_first=True)
    token_lens = torch.tensor([len(t) for t in targets])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(400):
        log_probs, out_lens = model(wav, wav_lens)
        loss = F.ctc_loss(log_probs.transpose(0, 1), tokens, out_lens, token_lens)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        log_probs, out_lens = model(wav, wav_lens)
    assert greedy_decode(log_probs, out_lens) == PHRASES
    assert BeamSearchDecoder(BeamConfig(beam_size=8))(log_probs, out_lens) == PHRASES
