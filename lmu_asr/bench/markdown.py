"""Measurement records -> the Markdown tables of the README's "Performance" section."""

from __future__ import annotations

import platform
from collections.abc import Iterable
from pathlib import Path


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        names = [ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")]
        cpu = f"{names[0]} ({len(names)} logical CPUs)" if names else cpu
    except OSError:
        pass
    import torch

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}{gpu}, torch {torch.__version__}"


def value(x: float, unit: str) -> str:
    if unit == "s" or unit == "s/frame":
        for scale, name in ((1, "s"), (1e-3, "ms"), (1e-6, "µs")):
            if abs(x) >= scale or name == "µs":
                return f"{x / scale:.3g} {name}" + ("/frame" if unit == "s/frame" else "")
    if unit == "FLOP/s":
        return f"{x / 1e12:.3g} TFLOP/s" if x >= 1e12 else f"{x / 1e9:.3g} GFLOP/s"
    return f"{x:,.3g} {unit}" if abs(x) < 1000 else f"{x:,.0f} {unit}"


def table(command: str, records: Iterable[dict]) -> str:
    records = list(records)
    configs = [r["config"] for r in records]
    common = {k: v for k, v in configs[0].items() if all(c.get(k) == v for c in configs)}
    lines = [f"`{command}`", ""]
    if common:
        lines += ["Common: " + ", ".join(f"{k}={v}" for k, v in common.items()) + ".", ""]
    lines += ["| measurement | configuration | median | min – max | ratio | bar |"]
    lines += ["|---|---|---|---|---|---|"]
    for r in records:
        config = ", ".join(f"{k}={v}" for k, v in r["config"].items() if k not in common)
        spread = f"{value(r['min'], r['unit'])} – {value(r['max'], r['unit'])}"
        ratio = f"{r['ratio']:.3g}" if "ratio" in r else ""
        bar = f"{r['bar']}: {'met' if r['met'] else 'MISSED'}" if "bar" in r else ""
        row = [r["name"], config, value(r["median"], r["unit"]), spread, ratio, bar]
        lines.append("| " + " | ".join(row) + " |")
    notes: dict[str, list[str]] = {}  # text -> measurements it explains
    for r in records:
        for text in (r.get("note"), r.get("ratio_is") and f"ratio = {r['ratio_is']}"):
            if text and r["name"] not in notes.setdefault(text, []):
                notes[text].append(r["name"])
    lines += [""] + [f"- {', '.join(names)}: {text}" for text, names in notes.items()]
    return "\n".join(lines).rstrip() + "\n"
