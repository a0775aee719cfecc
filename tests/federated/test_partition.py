"""Partitions of tiny Shakespeare into clients: by speaking role, Dirichlet, IID, by file."""

from pathlib import Path

import pytest

from deepseek_tf.config.loader import load_config, update_config
from deepseek_tf.errors import ConfigError
from deepseek_tf.federated.partition import partition, speech_blocks


@pytest.fixture(scope="module")
def data():
    return load_config("tiny").data  # seq_len 16, the bundled corpus


def _roles(path):
    return {s for s, _ in speech_blocks(Path(path).read_text(encoding="utf-8")) if s}


def test_by_speaker_gives_each_client_one_role_largest_first(data, tmp_path):
    clients = partition(data, "by-speaker", 16, tmp_path)
    assert [c.name for c in clients[:3]] == ["GLOUCESTER", "DUKE VINCENTIO", "KING RICHARD II"]
    assert all(_roles(c.path) == {c.name} for c in clients)  # non-IID: one role each
    sizes = [c.chars for c in clients]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 2 * sizes[-1]  # unbalanced


def test_dirichlet_concentrates_roles_and_iid_spreads_them(data, tmp_path):
    skewed = partition(data, "dirichlet:0.05", 4, tmp_path / "a", seed=1)
    even = partition(data, "iid", 4, tmp_path / "b", seed=1)
    total = sum(c.chars for c in even)
    assert max(c.chars for c in even) < 0.3 * total  # iid: about a quarter each
    glou = [Path(c.path).read_text().count("GLOUCESTER:") for c in skewed]
    assert max(glou) > 0.8 * sum(glou)  # one role mostly in one client
    assert sum(c.chars for c in skewed) == pytest.approx(total, rel=0.01)


def test_by_file(data, tmp_path):
    files = []
    for i in range(3):
        path = tmp_path / f"part{i}.txt"
        path.write_text(("To be, or not to be: that is the question.\n" * 30) + str(i))
        files.append(str(path))
    by_file = update_config(load_config("tiny"), data={"files": files}).data
    clients = partition(by_file, "by-file", 3, tmp_path / "clients")
    assert [c.name for c in clients] == ["part0.txt", "part1.txt", "part2.txt"]
    with pytest.raises(ConfigError, match="has only 3 files"):
        partition(by_file, "by-file", 4, tmp_path / "x")


@pytest.mark.parametrize(
    "spec,clients,match",
    [
        ("by-speaker", 500, "only"),
        ("dirichlet", 4, "dirichlet needs ALPHA"),
        ("dirichlet:-1", 4, "ALPHA must be a positive number"),
        ("by-color", 4, "choose iid | by-speaker"),
        ("iid", 0, "--clients"),
        ("iid", 40000, "too few for one training and one validation block"),
    ],
)
def test_bad_partitions(data, tmp_path, spec, clients, match):
    with pytest.raises(ConfigError, match=match):
        partition(data, spec, clients, tmp_path)
