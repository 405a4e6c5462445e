"""The command line: bad input exits with code 2 and a message that says the fix."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
  return subprocess.run([sys.executable, "main.py", *args], cwd=ROOT, text=True,
                        capture_output=True, timeout=300)


@pytest.mark.parametrize("override,expected", [
    ("--config.model.num_bitz=32", "num_bitz"),
    ("--config.model.num_bits=many", "num_bits"),
])
def test_mistyped_config_fields_exit_2(override, expected, tmp_path):
  result = run("--config=configs/fashion_mnist.py:tiny", override,
               f"--workdir={tmp_path}")
  assert result.returncode == 2, result.stderr
  assert expected in result.stderr and "--config." in result.stderr
  assert not os.listdir(tmp_path)


def test_invalid_config_value_exits_2_before_writing(tmp_path):
  workdir = tmp_path / "work"
  result = run("--config=configs/fashion_mnist.py:tiny", "--config.model.num_bits=0",
               f"--workdir={workdir}")
  assert result.returncode == 2
  assert "num_bits" in result.stderr and "positive code length" in result.stderr
  assert not workdir.exists()


@pytest.mark.slow
def test_workdir_that_cannot_be_created_exits_2(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  result = run("--config=configs/fashion_mnist.py:tiny", f"--workdir={blocker}/run")
  assert result.returncode == 2
  assert "not writable" in result.stderr and "--workdir" in result.stderr


def test_missing_dataset_says_how_to_get_it(tmp_path):
  result = run("--config=configs/cifar10.py:tiny", f"--workdir={tmp_path}/w",
               f"--config.data.data_dir={tmp_path}/no_tfds")
  assert result.returncode == 2
  assert "cifar10" in result.stderr and "download_and_prepare" in result.stderr


# The five commands and, for each, two bad command lines: (argv, what stderr names).
COMMANDS = {
    "main": ["main.py"],
    "experiments": ["-m", "psch_jax.commands.experiments"],
    "diagnostics": ["-m", "psch_jax.commands.diagnostics"],
    "search": ["-m", "psch_jax.commands.search"],
    "reports": ["-m", "psch_jax.commands.reports"],
}
WITH_CONFIG = ("main", "experiments", "diagnostics")
BAD_INPUT = [
    *[(command, ["--config=configs/no_such_file.py"], "no_such_file.py")
      for command in WITH_CONFIG],
    *[(command, ["--config=configs/fashion_mnist.py:tiny",
                 "--config.model.num_bitz=32"], "num_bitz") for command in WITH_CONFIG],
    # A value out of range, refused before the command reads or writes anything.
    *[(command, ["--config=configs/fashion_mnist.py:tiny",
                 "--config.train.keep_checkpoints=0"],
       "config.train.keep_checkpoints=0 must be >= 1") for command in WITH_CONFIG],
    ("search", ["--images=a.png"], "does not exist"),   # the bad path is the workdir
    ("search", ["--images=a.png", "--topkk=3"], "topkk"),
    ("reports", [], "config.json is missing"),
    ("reports", ["--workdirr=x"], "workdirr"),
]


def run_command(command, *args):
  return subprocess.run([sys.executable, *COMMANDS[command], *args], cwd=ROOT,
                        text=True, capture_output=True, timeout=300)


@pytest.mark.slow
@pytest.mark.parametrize("command,args,expected", BAD_INPUT)
def test_every_command_exits_2_on_bad_input_without_a_traceback(command, args,
                                                                expected, tmp_path):
  workdir = tmp_path / "work"
  result = run_command(command, *args, f"--workdir={workdir}")
  assert result.returncode == 2, result.stderr[-2000:]
  assert "error:" in result.stderr and expected in result.stderr
  assert "Traceback" not in result.stderr
  assert not workdir.exists()


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_lists_its_flags(command):
  # --help lists the command's own flags (not absl's and the libraries').
  result = run_command(command, "--help")
  assert "--workdir" in result.stdout and "Traceback" not in result.stderr
  assert ("--config" in result.stdout) == (command in WITH_CONFIG)
  assert ("--mode" in result.stdout) == (command == "main")
  assert "--jax_platforms" not in result.stdout


def test_unknown_config_variant_names_the_variants():
  result = run_command("main", "--config=configs/fashion_mnist.py:huge")
  assert result.returncode == 2 and "Traceback" not in result.stderr
  assert "huge" in result.stderr and "'paper', 'tiny'" in result.stderr


# What each command needs besides a stray argument, so that only the argument is wrong.
REQUIRED = {
    "main": ["--config=configs/fashion_mnist.py:tiny"],
    "experiments": ["--config=configs/fashion_mnist.py:tiny", "--methods=lsh"],
    "diagnostics": ["--config=configs/fashion_mnist.py:tiny"],
    "search": ["--images=a.png"],
    "reports": [],
}


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_a_stray_positional_argument_exits_2_naming_it_and_the_workdir_flag(
    command, tmp_path):
  stray = str(tmp_path / "run")
  extra = [] if command == "main" else [f"--workdir={tmp_path}/work"]
  result = run_command(command, *REQUIRED[command], *extra, stray)
  assert result.returncode == 2, result.stderr[-2000:]
  assert f"unexpected argument '{stray}'" in result.stderr
  assert f"--workdir={stray}" in result.stderr and "Traceback" not in result.stderr
  assert not os.listdir(tmp_path)  # neither the stray path nor a work directory


@pytest.mark.parametrize("override,expected", [
    # Failed at the first encoding step with no field named.
    ("--config.eval.batch_size=0", "config.eval.batch_size=0 must be >= 1; it is the "
                                   "images per encoding step"),
    # Trained to a non-finite loss at step 1 before.
    ("--config.data.std=(0.0,)", "config.data.std=(0.0,) holds 0.0, but every entry "
                                 "must be > 0"),
])
def test_values_that_used_to_fail_later_are_refused_up_front_naming_the_field(
    override, expected, tmp_path):
  workdir = tmp_path / "work"
  result = run("--config=configs/fashion_mnist.py:tiny", override,
               f"--workdir={workdir}")
  assert result.returncode == 2, result.stderr[-2000:]
  assert expected in result.stderr and "Traceback" not in result.stderr
  assert not workdir.exists()
