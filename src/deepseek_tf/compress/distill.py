"""Knowledge distillation: train a smaller student on a teacher's softened distribution.

`deepseek-tf compress distill TEACHER_RUN --student-config S.yaml --out OUT` builds the
student from its own config (own initialisation, seed `train.seed`), on the teacher's
tokenizer and data, and trains it from scratch for `steps` steps with its own learning-rate
schedule on

    (1 - alpha) * hard cross-entropy + alpha * T^2 KL(teacher_T || student_T)

where `_T` is the softmax at temperature `T`. The teacher runs in inference mode and
receives no gradient. `distill()` is the same loop as a Python function, so a benchmark
can train the same student with `alpha=0` (plain training from scratch) for comparison.
"""

from __future__ import annotations

import dataclasses
import sys
import time

import tensorflow as tf

from deepseek_tf.compress.finetune import train_in_memory, validation_loss
from deepseek_tf.compress.run_io import (
    check_out_dir,
    count_parameters,
    load_source,
    write_run,
)
from deepseek_tf.config.loader import (
    config_from_dict,
    config_to_dict,
    load_config,
    parse_override,
    parse_yaml,
    read_text_file,
)
from deepseek_tf.errors import CompressionError
from deepseek_tf.models.builder import build_model
from deepseek_tf.rundir import RunDir
from deepseek_tf.training.losses import distillation_term


def _explicit_keys(path, overrides) -> set[str]:
    """`section.key` names the student file's model/data sections or `--set` name."""
    keys = set()
    if path is not None:
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

    A bundled preset's data section is a default and silently replaced; a tokenizer or
    vocabulary the student's file or `--set` names explicitly must match the teacher's.

    Raises:
        CompressionError: tokenizer or vocabulary mismatch, or a student context
            (`model.max_seq_len`) shorter than the teacher's training sequences.
    """
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
    merged = config_to_dict(student)
    merged["data"] = config_to_dict(teacher_config)["data"]
    merged["model"]["vocab_size"] = vocab
    if steps > 0:
        merged["train"]["steps"] = steps
    return config_from_dict(merged)


def distill(
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
    train = dataclasses.replace(student_config.train, steps=steps or student_config.train.steps)
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


def run(args) -> dict:
    """`deepseek-tf compress distill`: trains the student, writes it as a new run."""
    check_options(args.alpha, args.temperature, args.steps)
    out = check_out_dir(args.run_dir, args.out)
    teacher_config = RunDir(args.run_dir).read_config()
    student_config = student_config_for(
        teacher_config,
        preset=args.student_preset,
        path=args.student_config,
        overrides=args.overrides,
        steps=args.steps,
    )  # every check before the teacher's weights are read
    start = time.perf_counter()
    teacher_config, teacher, tokenizer = load_source(args.run_dir)
    log = None if args.quiet else (lambda line: print(line, file=sys.stderr))
    student = distill(
        teacher,
        teacher_config,
        tokenizer,
        student_config,
        alpha=args.alpha,
        temperature=args.temperature,
        steps=student_config.train.steps,
        log=log,
    )
    batches = student_config.train.eval_batches
    record = {
        "method": "distill",
        "options": {
            "student": args.student_config or args.student_preset,
            "overrides": list(args.overrides),
            "alpha": args.alpha,
            "temperature": args.temperature,
            "steps": student_config.train.steps,
        },
        "teacher_parameters": count_parameters(teacher),
        "parameters_after": count_parameters(student),
        "val_loss_teacher": validation_loss(teacher, teacher_config, tokenizer, batches),
        "val_loss_after": validation_loss(student, student_config, tokenizer, batches),
    }
    record["seconds"] = round(time.perf_counter() - start, 3)
    write_run(out, student_config, tokenizer, student, args.run_dir, record)
    return record
