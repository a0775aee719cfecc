"""`deepseek-tf info`: described presets, readable counts, a run's training state."""

from deepseek_tf.cli.info_cmd import human
from deepseek_tf.cli.main import main
from deepseek_tf.config.loader import preset_names


def test_presets_have_one_line_descriptions(capsys):
    assert main(["info", "--presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == preset_names()
    assert all(len(line.split(None, 1)[1]) > 20 for line in lines)
    assert any("671B total" in line for line in lines)


def test_readable_counts_and_training_state(trained_run, capsys):
    assert [human(n) for n in (999, 23_840, 15_700_000_000, 671_026_419_200)] == [
        "999", "23.8K", "15.7B", "671.0B",
    ]  # fmt: skip
    assert main(["info", str(trained_run)]) == 0
    out = capsys.readouterr().out
    assert "parameters: " in out and " total, " in out
    assert "training: step 20 of 20; last val loss " in out
    assert out.rstrip().endswith("; the model is the last weights")  # no train.keep_best
