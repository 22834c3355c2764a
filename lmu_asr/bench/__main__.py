"""python -m lmu_asr.bench {lmu,data,train,decode,checkpoint,orchestration,tracking,all}
[--device cpu|cuda] [--threads N] [--save FILE] [--markdown]; python -m lmu_asr.bench markdown FILE
"""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
from pathlib import Path

from lmu_asr.bench.markdown import machine, table

GROUPS = {  # lmu_asr.bench.<group>: its measurements are run(args, device), its options
    "lmu": "LMU FFT vs recurrent vs nn.LSTM vs Transformer layer; the memory update alone",
    "data": "log-mel speed and loader throughput",
    "train": "training throughput, FLOP/s against the matmul peak, top operators",
    "decode": "real-time factor of greedy and beam decoding; streaming LMU step",
    "checkpoint": "checkpoint save and load time and size",
    "orchestration": "launch -m return, sbatch -> first step, requeue -> resume",
    "tracking": "training speed with MLflow off, down and up (--uri)",
}
MARKDOWN_HELP = "the README tables from a file written with --save"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m lmu_asr.bench", description=__doc__)
    sub = p.add_subparsers(dest="group", required=True)
    for name, help in GROUPS.items():
        _module(name).add_arguments(_common(sub.add_parser(name, help=help)))
    _common(sub.add_parser("all", help="every group above with its defaults"))
    _markdown_arguments(sub.add_parser("markdown", help=MARKDOWN_HELP))
    return p


def _markdown_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("file", type=Path, help="JSON records, one per line")
    return p


def _module(group: str):
    return importlib.import_module(f"lmu_asr.bench.{group}")


def _common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--device", default="cpu", help="cpu | cuda")
    p.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    p.add_argument("--save", type=Path, help="also append the JSON records to this file")
    p.add_argument("--markdown", action="store_true", help="print Markdown tables, not JSON")
    return p


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["markdown"]:  # without importing the groups (torch, the model)
        md = argparse.ArgumentParser(
            prog="python -m lmu_asr.bench markdown", description=MARKDOWN_HELP
        )
        records = _markdown_arguments(md).parse_args(argv[1:]).file.read_text().splitlines()
        print(markdown([json.loads(line) for line in records]))
        return
    args = parser().parse_args(argv)
    import torch

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    run = {"command": "python -m lmu_asr.bench " + shlex.join(argv), "machine": machine()}
    records = []
    for group in GROUPS if args.group == "all" else [args.group]:
        module = _module(group)
        group_args = args
        if args.group == "all":  # this group's defaults, with the common options given
            group_args = parser().parse_args([group, "--device", args.device])
            group_args.threads = args.threads
        for m in module.run(group_args, device):
            record = m.record(group) | run
            records.append(record)
            if not args.markdown:
                print(json.dumps(record), flush=True)
            if args.save:
                with args.save.open("a") as f:
                    f.write(json.dumps(record) + "\n")
    if args.markdown:
        print(markdown(records))


def markdown(records: list[dict]) -> str:
    out = []
    for group in dict.fromkeys(r["group"] for r in records):
        rows = [r for r in records if r["group"] == group]
        first = rows[0]
        out.append(f"#### {group}\n\n{first['machine']}\n\n{table(first['command'], rows)}")
    return "\n".join(out)


if __name__ == "__main__":
    main()
