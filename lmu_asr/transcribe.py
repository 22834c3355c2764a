"""Print transcripts of audio files.

python -m lmu_asr.transcribe checkpoint=RUN_DIR_OR_STEP_DIR audio=[a.wav,b.flac]
    [decoder=greedy|beam] [beam.beam_size=16]

Each file gets a line `path<TAB>transcript`; a file that cannot be transcribed (unreadable, too
short) gets `path<TAB>error: ...` on stderr, the others are still transcribed, and the command
then fails naming how many could not be.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from omegaconf import OmegaConf

from lmu_asr.decode import make_decoder
from lmu_asr.evaluate import beam_config, load_model, resolve_checkpoint, run_cli
from lmu_asr.speech_dataset import read_audio

USAGE = "usage: python -m lmu_asr.transcribe checkpoint=PATH audio=[a.wav,b.flac] [decoder=beam]"
KEYS = ("checkpoint", "audio", "decoder", "beam")


@torch.no_grad()
def transcripts(
    checkpoint: Path, audio: list[Path], decoder: str = "greedy", beam: list[str] | None = None
) -> Iterator[tuple[Path, str | ValueError]]:
    """(path, transcript) per file, or (path, ValueError) for one that cannot be transcribed;
    `beam` holds BeamConfig overrides like "beam_size=8"."""
    model, saved = load_model(resolve_checkpoint(checkpoint), torch.device("cpu"))
    decode = make_decoder(decoder, beam_config(beam or []))
    rate = saved["sample_rate"]
    for path in audio:  # one at a time: no padding, any length
        try:
            wav = read_audio(str(path), rate)
            lengths = torch.tensor([len(wav)])
            if model.encoder.subsample.output_lengths(model.frontend.lengths(lengths)) < 1:
                raise ValueError(
                    f"{path}: {len(wav) / rate:.3f} s of audio is too short for the model"
                )
        except ValueError as err:
            yield path, err
            continue
        log_probs, lengths = model(wav[None], lengths)
        yield path, decode(log_probs, lengths)[0]


def transcribe(
    checkpoint: Path, audio: list[Path], decoder: str = "greedy", beam: list[str] | None = None
) -> list[str]:
    """Transcripts of `audio` files; ValueError naming the first file that cannot be read."""
    texts = []
    for _, text in transcripts(checkpoint, audio, decoder, beam):
        if isinstance(text, ValueError):
            raise text
        texts.append(text)
    return texts


def main(argv: list[str] | None = None) -> None:
    args = OmegaConf.from_dotlist(list(sys.argv[1:] if argv is None else argv))
    if "checkpoint" not in args or "audio" not in args:
        sys.exit(USAGE)
    if unknown := sorted(set(args) - set(KEYS)):
        raise ValueError(f"unknown argument(s) {unknown}; expected {', '.join(KEYS)}\n{USAGE}")
    audio = args.audio if OmegaConf.is_list(args.audio) else [args.audio]
    if not audio or any(a in (None, "") for a in audio):
        raise ValueError(f"audio= names no file (got {list(audio)})\n{USAGE}")
    beam = OmegaConf.to_container(args.get("beam", OmegaConf.create({})))
    beam = [f"{k}={v}" for k, v in beam.items()]
    decoder = args.get("decoder", "greedy")
    failed = 0
    for path, text in transcripts(
        Path(args.checkpoint), [Path(str(a)) for a in audio], decoder, beam
    ):
        if isinstance(text, ValueError):
            failed += 1
            print(f"{path}\terror: {text}", file=sys.stderr, flush=True)
        else:
            print(f"{path}\t{text}", flush=True)
    if failed:
        raise ValueError(f"{failed} of {len(audio)} files could not be transcribed (see above)")


if __name__ == "__main__":
    run_cli(main)
