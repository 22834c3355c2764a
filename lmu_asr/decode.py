"""CTC decoding (greedy; beam search through torchaudio's flashlight decoder) and WER/CER."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import jiwer
from torch import Tensor
from torchaudio.functional import edit_distance

from lmu_asr.text import BLANK, VOCAB

SPACE = VOCAB.index(" ")


def greedy_decode(log_probs: Tensor, lengths: Tensor) -> list[str]:
    """(B, T, V) log-probs, (B,) lengths -> B transcripts: best path, repeats merged, blanks
    dropped."""
    best = log_probs.argmax(-1).cpu()  # (B, T)
    out = []
    for path, n in zip(best.tolist(), lengths.tolist(), strict=True):
        ids = [t for i, t in enumerate(path[:n]) if t != BLANK and (i == 0 or t != path[i - 1])]
        out.append(ids_to_text(ids))
    return out


def ids_to_text(ids: Sequence[int]) -> str:
    return " ".join("".join(VOCAB[i] for i in ids).split())


@dataclass
class BeamConfig:
    beam_size: int = 16
    nbest: int = 1
    lexicon: str | None = None  # word -> spelling file; None = lexicon-free
    lm: str | None = None  # KenLM binary/arpa; needs a lexicon
    lm_weight: float = 0.5  # lexicon decoding only (tuned on the demo's dev set)
    word_score: float = 1.0  # lexicon decoding only

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if self.lm and not self.lexicon:
            raise ValueError("beam.lm needs beam.lexicon (a word-level LM needs words)")
        for name in ("lexicon", "lm"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ValueError(f"beam.{name}: file not found: {path}")


class BeamSearchDecoder:
    """Lexicon-free (or lexicon + KenLM) CTC beam search over our vocabulary."""

    # flashlight needs named blank and word-separator tokens; map ours onto them
    _TOKENS = ["-", "|"] + list(VOCAB[2:])

    def __init__(self, cfg: BeamConfig):
        from torchaudio.models.decoder import ctc_decoder

        self._words = cfg.lexicon is not None
        self._decoder = ctc_decoder(
            lexicon=cfg.lexicon,
            tokens=self._TOKENS,
            lm=cfg.lm,
            nbest=cfg.nbest,
            beam_size=cfg.beam_size,
            lm_weight=cfg.lm_weight,
            word_score=cfg.word_score,
            blank_token="-",
            sil_token="|",
            unk_word="<unk>",
        )

    def __call__(self, log_probs: Tensor, lengths: Tensor) -> list[str]:
        hyps = self._decoder(log_probs.detach().float().cpu().contiguous(), lengths.cpu().int())
        if self._words:  # lexicon decoding: the words themselves
            return [" ".join(h[0].words) if h else "" for h in hyps]
        # tokens come back with repeats merged and blanks removed; "|" maps to our space
        return [ids_to_text(h[0].tokens.tolist()) if h else "" for h in hyps]


Decoder = Callable[[Tensor, Tensor], list[str]]  # (log-probs (B, T, V), lengths (B,)) -> texts


def make_decoder(kind: str, beam: BeamConfig | None = None) -> Decoder:
    if kind == "greedy":
        return greedy_decode
    if kind == "beam":
        return BeamSearchDecoder(beam or BeamConfig())
    raise ValueError(f"decoder must be 'greedy' or 'beam', got {kind!r}")


def error_rates(
    refs: Sequence[str], hyps: Sequence[str], transform: Callable[[str], str] | None = None
) -> dict[str, float]:
    """Corpus-level WER and CER: edit distance over words / characters (spaces included) divided
    by the number of reference words / characters. `transform` (e.g. the GigaSpeech scoring rules)
    is applied to references and hypotheses alike; an empty reference counts every hypothesis
    word as an insertion."""
    t = transform or (lambda s: s)
    word_err = char_err = n_words = n_chars = 0
    for ref, hyp in zip(refs, hyps, strict=True):
        ref, hyp = " ".join(t(ref).split()), " ".join(t(hyp).split())
        word_err += edit_distance(ref.split(), hyp.split())
        char_err += edit_distance(ref, hyp)
        n_words += len(ref.split())
        n_chars += len(ref)
    return {
        "wer": word_err / max(n_words, 1),
        "cer": char_err / max(n_chars, 1),
        "words": n_words,
        "word_errors": word_err,
        "chars": n_chars,
        "char_errors": char_err,
    }


def alignment(ref: str, hyp: str) -> str:
    """Human-readable word alignment of one utterance (jiwer's REF/HYP lines)."""
    if not ref.strip() or not hyp.strip():
        return f"REF: {ref}\nHYP: {hyp}"
    return jiwer.visualize_alignment(jiwer.process_words(ref, hyp), show_measures=False).strip()
