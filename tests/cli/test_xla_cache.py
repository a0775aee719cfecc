"""The command line keeps compiled XLA programs between processes (`deepseek_tf.xla_cache`)."""

import os
import shutil
import subprocess
import sys

from deepseek_tf import xla_cache
from deepseek_tf.config.loader import update_config
from deepseek_tf.rundir import RunDir


def test_the_flag_is_added_once_and_can_be_turned_off(tmp_path):
    env = {"DEEPSEEK_TF_XLA_CACHE": str(tmp_path)}
    assert xla_cache.enable(env) == str(tmp_path)
    assert env["TF_XLA_FLAGS"] == f"--tf_xla_persistent_cache_directory={tmp_path}"
    assert xla_cache.enable(env) is None  # already there: left as it is
    for off in ("off", "", "0"):
        assert xla_cache.enable({"DEEPSEEK_TF_XLA_CACHE": off}) is None
    default = {}
    assert xla_cache.enable(default).endswith(os.path.join(".cache", "deepseek-tf", "xla"))


def test_a_command_writes_its_compiled_programs_there(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    config = RunDir(run).read_config()
    RunDir(run).write_config(update_config(config, runtime={"jit_compile": True}))
    cache = tmp_path / "xla"
    env = {**os.environ, "DEEPSEEK_TF_XLA_CACHE": str(cache), "TF_XLA_FLAGS": ""}
    cmd = [sys.executable, "-m", "deepseek_tf.cli.main", "generate", str(run),
           "--prompt", "Th", "--max-new-tokens", "3"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-800:]
    assert any(p.name.startswith("xla_compile_cache") for p in cache.iterdir())
