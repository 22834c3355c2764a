"""Print transcripts of audio files.

python -m lmu_asr.transcribe checkpoint=RUN_DIR_OR_STEP_DIR audio=[a.wav,b.flac]
    [decoder=greedy|beam] [beam.beam_size=16]
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lmu_asr.decode import make_decoder
from lmu_asr.evaluate import beam_config, load_model, resolve_checkpoint, run_cli
from lmu_asr.speech_dataset import read_audio

USAGE = "usage: python -m lmu_asr.transcribe checkpoint=PATH audio=[a.wav,b.flac] [decoder=beam]"


@torch.no_grad()
def transcribe(
    checkpoint: Path, audio: list[Path], decoder: str = "greedy", beam: list[str] | None = None
) -> list[str]:
    """Transcripts of `audio` files; `beam` holds BeamConfig overrides like "beam_size=8"."""
    model, saved = load_model(resolve_checkpoint(checkpoint), torch.device("cpu"))
    decode = make_decoder(decoder, beam_config(beam or []))
    texts = []
    for path in audio:  # one at a time: no padding, any length
        wav = read_audio(str(path), saved["sample_rate"])
        log_probs, lengths = model(wav[None], torch.tensor([len(wav)]))
        texts.append(decode(log_probs, lengths)[0])
    return texts


def main(argv: list[str] | None = None) -> None:
    args = OmegaConf.from_dotlist(list(sys.argv[1:] if argv is None else argv))
    if "checkpoint" not in args or "audio" not in args:
        sys.exit(USAGE)
    audio = args.audio if OmegaConf.is_list(args.audio) else [args.audio]
    beam = OmegaConf.to_container(args.get("beam", OmegaConf.create({})))
    beam = [f"{k}={v}" for k, v in beam.items()]
    decoder = args.get("decoder", "greedy")
    texts = transcribe(Path(args.checkpoint), [Path(a) for a in audio], decoder, beam)
    for path, text in zip(audio, texts, strict=True):
        print(f"{path}\t{text}")


if __name__ == "__main__":
    run_cli(main)
