"""Knowledge distillation: train a smaller student on a teacher's softened distribution.

`deepseek-tf compress distill TEACHER_RUN --student-config S.yaml --out OUT` builds the
student from its own config (own initialisation, seed `train.seed`), on the teacher's
tokenizer and data, and trains it from scratch for `steps` steps with its own learning-rate
schedule on

    (1 - alpha) * hard cross-entropy + alpha * T^2 KL(teacher_T || student_T)

where `_T` is the softmax at temperature `T`. The teacher runs in inference mode and
receives no gradient. `distill_model()` is the training on models in memory, so a
benchmark can train the same student with `alpha=0` (plain training from scratch) for
comparison; `distill()` is the whole job on run directories.
"""

from __future__ import annotations

import functools
from pathlib import Path

import tensorflow as tf

from deepseek_tf.compress.finetune import train_in_memory
from deepseek_tf.compress.job import Plan, Result, check_float, check_int, run_job
from deepseek_tf.compress.run_io import Log, Source
from deepseek_tf.config.loader import (
    apply_overrides,
    config_to_dict,
    load_config,
    parse_override,
    parse_yaml,
    read_text_file,
    update_config,
)
from deepseek_tf.config.schema import Config
from deepseek_tf.errors import CompressionError
from deepseek_tf.models.builder import build_model
from deepseek_tf.training.losses import distillation_term


def _explicit_keys(path, overrides) -> set[str]:
    """`section.key` names the student file's model/data sections or `--set` name (a
    `Config` object names none: every value is resolved, none stands out)."""
    keys = set()
    if path is not None and not isinstance(path, Config):
        raw = parse_yaml(read_text_file(path, "student config"), str(path)) or {}
        for section in ("model", "data"):
            values = raw.get(section) if isinstance(raw, dict) else None
            keys.update(f"{section}.{k}" for k in (values or {}))
    for text in overrides:
        section, key, _ = parse_override(text)
        keys.add(f"{section}.{key}")
    return keys


def student_config_for(teacher_config, *, preset=None, path=None, overrides=(), steps: int = 0):
    """The student's `Config`: its own model/train/runtime, the teacher's data and vocabulary.

    `path` is the student's YAML file or a `Config` (else `preset`); `overrides` are
    `--set` strings. A bundled preset's data section is a default and silently replaced;
    a tokenizer or vocabulary the student's file or `--set` names explicitly must match
    the teacher's.

    Raises:
        CompressionError: tokenizer or vocabulary mismatch, or a student context
            (`model.max_seq_len`) shorter than the teacher's training sequences.
    """
    if isinstance(path, Config):
        student = apply_overrides(path, overrides)
    else:
        student = load_config(preset=preset, path=path, overrides=overrides)
    explicit = _explicit_keys(path, overrides)
    t_data, s_data = teacher_config.data, student.data
    if "data.tokenizer" in explicit and s_data.tokenizer != t_data.tokenizer:
        raise CompressionError(
            f"student data.tokenizer={s_data.tokenizer!r} differs from the teacher's "
            f"{t_data.tokenizer!r} tokenizer; a student uses the teacher's tokenizer"
        )
    bpe = t_data.tokenizer == "bpe"
    if "data.vocab_size" in explicit and bpe and s_data.vocab_size != t_data.vocab_size:
        raise CompressionError(
            f"student data.vocab_size={s_data.vocab_size} differs from the teacher's "
            f"bpe vocabulary of {t_data.vocab_size}; a student uses the teacher's tokenizer"
        )
    vocab = teacher_config.model.vocab_size
    if "model.vocab_size" in explicit and student.model.vocab_size not in (0, vocab):
        raise CompressionError(
            f"student model.vocab_size={student.model.vocab_size} differs from the "
            f"teacher's {vocab}; a student uses the teacher's tokenizer"
        )
    packed = t_data.packed_length()
    if student.model.max_seq_len < packed:
        raise CompressionError(
            f"student model.max_seq_len={student.model.max_seq_len} is shorter than the "
            f"teacher's training sequences (data.seq_len={packed})"
        )
    changes = {"data": config_to_dict(teacher_config)["data"], "model": {"vocab_size": vocab}}
    if steps > 0:
        changes["train"] = {"steps": steps}
    return update_config(student, **changes)


def distill_model(
    teacher,
    teacher_config,
    tokenizer,
    student_config,
    *,
    alpha: float,
    temperature: float,
    steps: int = 0,
    log=print,
):
    """Builds the student of `student_config` and trains it from scratch against `teacher`.

    The student trains with the one training step (its own MTP and MoE balance losses,
    loss scaling, bias updates) on `(1 - alpha)` times its data losses plus `alpha` times
    the distillation term, with its own `train` schedule.

    Args:
        teacher: the trained `CausalLM` (inference mode, not updated).
        teacher_config: the teacher's config (its data section feeds the student).
        tokenizer: the teacher's tokenizer.
        student_config: the student's resolved config (see `student_config_for`); its
            `model.vocab_size` must be 0 or the teacher's.
        alpha: weight of the distillation term; the hard loss has weight `1 - alpha`
            (0: plain training, the teacher is not even run).
        temperature: softmax temperature of both distributions in the KL term.
        steps: optimizer steps (0: the student's `train.steps`).
        log: printer of a progress line every ~10% of the steps (None: silent).

    Returns:
        The trained student `CausalLM`.
    """
    check_options(alpha, temperature, steps)
    if student_config.model.vocab_size not in (0, teacher.vocab_size):
        raise CompressionError(
            f"student model.vocab_size={student_config.model.vocab_size} differs from the "
            f"teacher's {teacher.vocab_size}"
        )
    train = update_config(
        student_config, train={"steps": steps or student_config.train.steps}
    ).train
    student = build_model(student_config, teacher.vocab_size, seed=train.seed)
    teacher.trainable = False  # its forward pass is not recorded for gradients

    def soft_loss(inputs, targets, weights, logits):
        teacher_logits = tf.stop_gradient(teacher(inputs, training=False))  # (B, T, V)
        return alpha * distillation_term(teacher_logits, logits, weights, temperature)

    train_in_memory(
        student,
        student_config,
        tokenizer,
        train,
        extra_loss=soft_loss if alpha > 0 else None,
        hard_loss_weight=1.0 - alpha,
        log=log,
        label="distill",
    )
    return student


def check_options(alpha: float, temperature: float, steps: int) -> None:
    """One-line `CompressionError`s for out-of-range options."""
    if not 0.0 <= alpha <= 1.0:
        raise CompressionError(f"--alpha: must be in [0, 1], got {alpha}")
    if not temperature > 0:
        raise CompressionError(f"--temperature: must be > 0, got {temperature}")
    if steps < 0:
        raise CompressionError(f"--steps: must be >= 0, got {steps}")


def distill(
    run_dir,
    *,
    out,
    student_config: str | Path | Config | None = None,
    student_preset: str | None = None,
    overrides=(),
    alpha: float = 0.5,
    temperature: float = 2.0,
    steps: int = 0,
    quiet: bool = False,
) -> dict:
    """Trains a student on a teacher run's softened distribution and writes it as a new
    run (`deepseek-tf compress distill`; see the module docstring).

    Args:
        run_dir: the teacher run.
        out: the student's run directory.
        student_config: the student's YAML file (or a `Config`); exactly one of it and
            `student_preset`.
        student_preset: a bundled preset for the student.
        overrides: `section.key=value` changes to the student config (`--set`).
        alpha: weight of the distillation term in [0, 1] (the hard loss has `1 - alpha`).
        temperature: softmax temperature of the distillation term (> 0).
        steps: student training steps (0: the student's `train.steps`).
        quiet: no progress lines.

    Returns:
        The record (`compress.job`; "before" is the teacher), with `options`
        {student, overrides, alpha, temperature, steps}.

    Raises:
        CompressionError: an option out of range, or a student that cannot use the
            teacher's tokenizer and data (before the teacher's weights are read).

    Examples:
        >>> from deepseek_tf import compress
        >>> compress.distill(  # doctest: +SKIP
        ...     "runs/tiny", out="runs/student", student_preset="tiny",
        ...     overrides=["model.n_layers=1"])
    """
    if (student_config is None) == (student_preset is None):
        raise CompressionError("give one of --student-config and --student-preset")
    if isinstance(overrides, str):
        overrides = [overrides]
    alpha, temperature = check_float("alpha", alpha), check_float("temperature", temperature)
    check_options(alpha, temperature, check_int("steps", steps))
    student = student_config if student_config is not None else student_preset
    named = "Config object" if isinstance(student, Config) else str(student)

    def plan_for(teacher_config) -> Plan:
        resolved = student_config_for(
            teacher_config,
            preset=student_preset,
            path=student_config,
            overrides=overrides,
            steps=steps,
        )
        options = {"student": named, "overrides": list(overrides), "alpha": alpha}
        options.update(temperature=temperature, steps=resolved.train.steps)
        transform = functools.partial(
            _distilled, student_config=resolved, alpha=alpha, temperature=temperature
        )
        return Plan("distill", options, transform)

    return run_job(run_dir, out, plan_for, quiet=quiet)


def _distilled(source: Source, log: Log, *, student_config, alpha, temperature) -> Result:
    """The trained student (the job's transform)."""
    student = distill_model(
        source.model,
        source.config,
        source.tokenizer,
        student_config,
        alpha=alpha,
        temperature=temperature,
        steps=student_config.train.steps,
        log=log,
    )
    return Result(student_config, student)
