"""Benchmarks: `python -m lmu_asr.bench {lmu,data,train,decode,checkpoint,orchestration,
tracking,all} [--markdown]`.

Each measurement is one JSON object (`measure.Measurement`): name, configuration, median / min /
max over repeats, unit, and its ratio to a baseline measured in the same run. Shared machines are
noisy: compare the ratios, not one absolute time.
"""
