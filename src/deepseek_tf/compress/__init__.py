"""Compression of trained runs for Keras 3: quantisation (PTQ, QAT), structured pruning,
distillation and low-rank factorisation. Every method reads a run directory and writes a
new one that `deepseek-tf eval/generate/export/serve` load like any other."""
