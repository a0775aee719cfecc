"""Helpers of the compression tests: small runs trained through the command line (the
interface that stays put while the Python API's training verb is reworked)."""

from deepseek_tf.cli.main import main


def train_run(run_dir, preset: str, overrides) -> None:
    """Trains `preset` with `overrides` (`section.key=value`) into `run_dir`."""
    argv = ["train", "--preset", preset, "--out", str(run_dir), "--sample-tokens", "0"]
    for override in overrides:
        argv += ["--set", override]
    assert main(argv) == 0
