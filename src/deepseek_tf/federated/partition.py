"""Splitting a corpus into federated clients, each with its own train and validation part.

- `iid`: the corpus's speech blocks (paragraphs) shuffled and dealt out evenly.
- `by-speaker`: one client per speaking role, as the LEAF / TensorFlow Federated
  Shakespeare benchmark builds its clients -- very non-IID (every role has its own
  vocabulary and style) and unbalanced. With `N` clients, the `N` roles with the most
  text. A block is a role's speech when its first line is `NAME:`.
- `dirichlet:ALPHA`: every role's blocks spread over the clients with proportions drawn
  from `Dirichlet(ALPHA)`: small ALPHA, each role mostly in one client (non-IID); large
  ALPHA, close to IID.
- `by-file`: one client per data file.

Each client's text is written to `RUN/clients/client_NNN.txt`; its validation part is the
tail `data.val_fraction` of that file, so the ordinary data pipeline reads every client.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepseek_tf.data.corpus import read_texts, resolve_files, split_text
from deepseek_tf.errors import ConfigError

PARTITIONS = ("iid", "by-speaker", "dirichlet:ALPHA", "by-file")
_SPEAKER = re.compile(r"^([A-Z][A-Za-z' ,.&-]*):$")


@dataclass(frozen=True)
class Client:
    """One client: its name (a role, a file, `client 3`) and its text file."""

    index: int
    name: str
    path: str
    chars: int


def parse_partition(spec: str) -> tuple[str, float | None]:
    """`"dirichlet:0.1"` -> `("dirichlet", 0.1)`; checked, with one-line errors."""
    kind, _, value = spec.partition(":")
    if kind == "dirichlet":
        try:
            alpha = float(value)
        except ValueError:
            raise ConfigError(
                f"--partition {spec!r}: dirichlet needs ALPHA, e.g. dirichlet:0.1"
            ) from None
        if not alpha > 0 or not np.isfinite(alpha):
            raise ConfigError(f"--partition {spec!r}: ALPHA must be a positive number")
        return kind, alpha
    if kind not in ("iid", "by-speaker", "by-file") or value:
        raise ConfigError(f"--partition {spec!r}: choose {' | '.join(PARTITIONS)}")
    return kind, None


def speech_blocks(text: str) -> list[tuple[str, str]]:
    """`(speaker, block)` of every blank-line separated block (speaker `""` when the block
    does not start with `NAME:`)."""
    out = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        first = block.split("\n", 1)[0]
        match = _SPEAKER.match(first)
        out.append((match.group(1) if match else "", block + "\n\n"))
    return out


def _by_speaker(blocks, n: int, min_chars: int) -> list[tuple[str, str]]:
    roles: dict[str, list[str]] = {}
    for speaker, block in blocks:
        if speaker:
            roles.setdefault(speaker, []).append(block)
    ranked = sorted(roles.items(), key=lambda kv: (-sum(map(len, kv[1])), kv[0]))
    usable = [(name, "".join(parts)) for name, parts in ranked if sum(map(len, parts)) >= min_chars]
    if len(usable) < n:
        raise ConfigError(
            f"--clients {n}: the corpus has only {len(usable)} speaking roles with enough text "
            f"(>= {min_chars} characters) for one client each"
        )
    return usable[:n]


def _dirichlet(blocks, n: int, alpha: float, rng) -> list[tuple[str, str]]:
    roles: dict[str, list[str]] = {}
    for speaker, block in blocks:
        roles.setdefault(speaker or "?", []).append(block)
    parts = [[] for _ in range(n)]
    for _, role_blocks in sorted(roles.items()):
        share = rng.dirichlet(np.full(n, alpha))
        owners = rng.choice(n, size=len(role_blocks), p=share)
        for owner, block in zip(owners, role_blocks):
            parts[owner].append(block)
    return [(f"client {i}", "".join(p)) for i, p in enumerate(parts)]


def partition(data_cfg, spec: str, n: int, out_dir, seed: int = 0) -> list[Client]:
    """Writes `n` client files into `out_dir` by partition `spec`; returns the clients.

    Raises:
        ConfigError: an unknown partition, more clients than roles or files, or a client
            whose train or validation part cannot hold one block of `data.seq_len + 1`
            characters.
    """
    kind, alpha = parse_partition(spec)
    if n < 1:
        raise ConfigError(f"--clients: must be >= 1, got {n}")
    files = resolve_files(data_cfg.files)
    texts = read_texts(files)
    block = data_cfg.seq_len + 1
    min_chars = int(np.ceil(block / data_cfg.val_fraction)) + block  # a val and a train block
    rng = np.random.default_rng(seed)
    if kind == "by-file":
        if len(files) < n:
            raise ConfigError(f"--clients {n}: --partition by-file has only {len(files)} files")
        named = [(Path(f).name, t) for f, t in zip(files[:n], texts[:n])]
    else:
        blocks = [b for text in texts for b in speech_blocks(text)]
        if kind == "by-speaker":
            named = _by_speaker(blocks, n, min_chars)
        elif kind == "dirichlet":
            named = _dirichlet(blocks, n, alpha, rng)
        else:  # iid
            order = rng.permutation(len(blocks))
            named = [(f"client {i}", "".join(blocks[j][1] for j in order[i::n])) for i in range(n)]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    clients = []
    for i, (name, text) in enumerate(named):
        train, val = split_text(text, data_cfg.val_fraction)
        if len(train) < block or len(val) < block:
            raise ConfigError(
                f"--partition {spec}: client {i} ({name}) has {len(text)} characters, too few "
                f"for one training and one validation block of {block} (seq_len + 1); use "
                "fewer clients or another partition"
            )
        path = out_dir / f"client_{i:03d}.txt"
        path.write_text(text, encoding="utf-8")
        clients.append(Client(i, name, str(path), len(text)))
    return clients
