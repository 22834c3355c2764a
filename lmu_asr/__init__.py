"""lmu_asr: attention-enhanced Legendre Memory Unit CTC speech recognition."""

__version__ = "0.1.0"
