"""A quiet, fast command line and library: no TensorFlow for --help/--version/info
--presets, and no start-up notices on stderr unless --verbose (real errors still shown),
from the command line or from a script using the Python API."""

import os
import subprocess
import sys

import pytest

from deepseek_tf.quiet import NOISE

CHECK = (
    "import sys\n"
    "from deepseek_tf.cli.main import main\n"
    "try:\n"
    "    code = main(sys.argv[1:])\n"
    "except SystemExit as e:\n"
    "    code = e.code\n"
    "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n"
    "sys.exit(code)\n"
)


def test_help_version_and_presets_do_not_load_tensorflow():
    for argv in (["--help"], ["--version"], ["info", "--presets"], ["serve", "--help"]):
        out = subprocess.run([sys.executable, "-c", CHECK, *argv], capture_output=True,
                             text=True, timeout=60)  # fmt: skip
        assert out.returncode == 0, (argv, out.stderr[-500:])
    version = subprocess.run([sys.executable, "-c", CHECK, "--version"], capture_output=True,
                             text=True, timeout=60)  # fmt: skip
    assert version.stdout.startswith("deepseek-tf ")


@pytest.mark.slow  # heavier: run by .ci/run (-m slow)
def test_commands_print_no_tensorflow_notices(trained_run):
    env = {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP")}
    cmd = [sys.executable, "-m", "deepseek_tf.cli.main", "generate", str(trained_run),
           "--prompt", "Th", "--max-new-tokens", "3"]  # fmt: skip
    quiet = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert quiet.returncode == 0, quiet.stderr[-500:]
    assert "cuInit" not in quiet.stderr and "I0000" not in quiet.stderr, quiet.stderr
    verbose = subprocess.run([*cmd[:3], "--verbose", *cmd[3:]], capture_output=True, text=True,
                             timeout=300, env=env)  # fmt: skip
    assert verbose.returncode == 0 and "absl::InitializeLog" in verbose.stderr


def _no_tf_log_env() -> dict:
    return {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP")}


def test_the_python_api_is_as_quiet_as_the_command_line():
    """A script importing deepseek_tf and calling the API shows no C++ start-up lines."""
    script = (
        "import sys\nimport deepseek_tf as ds\nimport deepseek_tf.api\n"
        "print(ds.info(preset='tiny')['parameters']['total'])\n"
        "print(sorted({'tensorflow_probability', 'dp_accounting'} & set(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=_no_tf_log_env())  # fmt: skip
    assert done.returncode == 0, done.stderr[-500:]
    # and fast: TensorFlow Probability and dp_accounting load only when a model uses them
    assert done.stdout.split() == ["23840", "[]"]
    assert "absl::InitializeLog" not in done.stderr and "I0000" not in done.stderr, done.stderr
    assert "cuInit" not in done.stderr, done.stderr


def test_verbose_shows_the_start_up_lines_the_default_hides():
    base = [sys.executable, "-m", "deepseek_tf.cli.main"]
    runs = {
        flag: subprocess.run(
            [*base, *flag, "info", "--preset", "tiny"],
            capture_output=True,
            text=True,
            timeout=300,
            env=_no_tf_log_env(),
        )  # fmt: skip
        for flag in ((), ("-v",))
    }
    assert all(r.returncode == 0 for r in runs.values()), runs
    assert "absl::InitializeLog" not in runs[()].stderr, runs[()].stderr
    assert "absl::InitializeLog" in runs[("-v",)].stderr


def test_only_known_notices_are_dropped():
    notices = [
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR",
        "I0000 00:00:1796148762.707185   19155 port.cc:153] oneDNN custom operations are on.",
        "E0000 00:00:1796148715.776230   18911 cuda_platform.cc:52] failed call to cuInit: "
        "INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)",
        "To enable the following instructions: AVX2 AVX512F FMA, in other operations, rebuild "
        "TensorFlow with the appropriate compiler flags.",
    ]
    assert all(NOISE.match(line) for line in notices)
    real = [
        "E0000 00:00:1796148715.776230   18911 op_kernel.cc:1] Invalid argument: bad shape",
        "Traceback (most recent call last):",
        "ImportError: libfoo.so: cannot open shared object file",
    ]
    assert not any(NOISE.match(line) for line in real)
