"""A user mistake is one line on stderr (exit status 2 for usage, 1 for a failed run) and no traceback; a bug
keeps its traceback; --debug / SINKHORN_HF_DEBUG=1 shows the full one. Subprocess tests run the commands as a
user types them (each costs a Python start with torch and transformers: all but one are marked slow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sinkhorn_hf.cli import build_parser
from sinkhorn_hf.user_errors import (
    ErrorExit,
    ShortUsageParser,
    UsageError,
    UserError,
    check_checkpoint_dir,
    debug_requested,
    one_line_errors,
)

ROOT = Path(__file__).resolve().parents[1]
SST2 = ROOT.parent / "shared" / "data" / "glue" / "SST-2"


def run(*command: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **env}
    environment.pop("SINKHORN_HF_DEBUG", None)
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd, env=environment, timeout=600)


def assert_one_line(done: subprocess.CompletedProcess, status: int, *fragments: str, lines: int = 1) -> str:
    """Exit ``status``, no traceback, at most ``lines`` lines on stderr, the last naming every fragment."""
    err = done.stderr
    assert done.returncode == status, (done.returncode, err[-3000:])
    assert "Traceback" not in err, err[-3000:]
    shown = [line for line in err.splitlines() if line.strip()]
    assert 1 <= len(shown) <= lines, err
    for fragment in fragments:
        assert fragment in shown[-1], (fragment, shown[-1])
    return shown[-1]


# ------------------------------------------------------------------ the handler, in-process


def test_a_user_error_becomes_one_line_and_its_status(capsys):
    with pytest.raises(ErrorExit) as stop, one_line_errors("prog"):
        raise UsageError("--flag x: no such file\n(and a second line)")
    assert stop.value.code == 2
    assert capsys.readouterr().err == "prog: error: --flag x: no such file (and a second line)\n"
    with pytest.raises(ErrorExit) as stop, one_line_errors("prog", also=(KeyError,)):
        raise KeyError("listed type")
    assert stop.value.code == 1 and "prog: error: 'listed type'" in capsys.readouterr().err


def test_a_bug_keeps_its_traceback_and_debug_keeps_a_user_error():
    with pytest.raises(ZeroDivisionError), one_line_errors("prog"):
        1 / 0  # noqa: B018
    with pytest.raises(UserError, match="kept"), one_line_errors("prog", debug=True):
        raise UserError("kept")


def test_other_ranks_exit_without_printing(capsys):
    with pytest.raises(ErrorExit), one_line_errors("prog", quiet=True):
        raise UserError("said once, by rank 0")
    assert capsys.readouterr().err == ""


def test_debug_flag_and_environment(monkeypatch):
    monkeypatch.delenv("SINKHORN_HF_DEBUG", raising=False)
    assert debug_requested(["a", "--debug", "b"]) == (["a", "b"], True)
    assert debug_requested(["a"]) == (["a"], False)
    monkeypatch.setenv("SINKHORN_HF_DEBUG", "1")
    assert debug_requested(["a"]) == (["a"], True)
    monkeypatch.setenv("SINKHORN_HF_DEBUG", "0")
    assert debug_requested(["a"]) == (["a"], False)


def test_a_parser_error_is_a_usage_hint_and_the_error(capsys):
    parser = ShortUsageParser(prog="tool")
    for index in range(40):
        parser.add_argument(f"--option_{index}", help="an option with help text " * 3)
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--option_1"])
    err = capsys.readouterr().err.splitlines()
    assert stop.value.code == 2
    assert err == [
        "usage: tool ... (all options: tool --help)",
        "tool: error: argument --option_1: expected one argument",
    ]


def test_checkpoint_dir_names_a_missing_or_empty_folder(tmp_path):
    with pytest.raises(UsageError, match=r"--model .*/gone: this folder does not exist"):
        check_checkpoint_dir(str(tmp_path / "gone"), "--model")
    with pytest.raises(UsageError, match="is not a transformers checkpoint: it has no config.json \\(it is empty\\)"):
        check_checkpoint_dir(str(tmp_path), "--model")
    check_checkpoint_dir("user/model-on-the-hub", "--model")  # a Hub id is left to the Hub


@pytest.mark.parametrize("spelling", ["--max-length", "--max_length"])
def test_subcommand_flags_take_both_spellings(spelling):
    args = build_parser().parse_args(["diagnose", "m", spelling, "7"])
    assert args.max_length == 7
    args = build_parser().parse_args(["demo", "--output-dir", "x", "--num-train-epochs", "2"])
    assert (str(args.output_dir), args.num_train_epochs) == ("x", 2)


# ------------------------------------------------------------------ the commands, as a user runs them


def test_export_of_a_missing_folder_says_the_folder_does_not_exist(tmp_path):
    done = run(sys.executable, "-m", "sinkhorn_hf.cli", "export", str(tmp_path / "missing"), "x.onnx", cwd=tmp_path)
    assert_one_line(done, 2, "sinkhorn-hf export: error:", "missing: this folder does not exist")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_diagnose_a_missing_and_an_empty_folder(tmp_path):
    done = run(sys.executable, "-m", "sinkhorn_hf.cli", "diagnose", str(tmp_path / "missing"))
    assert_one_line(done, 2, "sinkhorn-hf diagnose: error:", "this folder does not exist")
    done = run(sys.executable, "-m", "sinkhorn_hf.cli", "diagnose", str(tmp_path))
    assert_one_line(done, 2, "has no config.json (it is empty)")
    done = run(sys.executable, "-m", "sinkhorn_hf.cli", "diagnose", str(tmp_path), "--debug")
    assert done.returncode == 1 and "Traceback" in done.stderr and "UsageError" in done.stderr


def glue_command(tmp_path: Path, *flags: str) -> list[str]:
    defaults = {
        "--model_name_or_path": str(tmp_path / "model"),
        "--task_name": "sst2",
        "--train_file": str(SST2 / "train.tsv"),
        "--validation_file": str(SST2 / "dev.tsv"),
        "--output_dir": str(tmp_path / "out"),
    }
    given = dict(zip(flags[::2], flags[1::2], strict=True))
    return [
        sys.executable,
        str(ROOT / "scripts" / "run_glue.py"),
        *(x for kv in {**defaults, **given}.items() for x in kv),
    ]


@pytest.mark.slow
def test_run_glue_missing_train_file_and_missing_model_folder(tmp_path, minilm_path):
    done = run(*glue_command(tmp_path, "--model_name_or_path", str(minilm_path), "--train_file", "missing.tsv"))
    assert_one_line(done, 2, "run_glue.py: error: --train_file missing.tsv: this file does not exist")
    done = run(*glue_command(tmp_path))  # --model_name_or_path: a folder that is not there
    assert_one_line(done, 2, "--model_name_or_path", "model: this folder does not exist")
    assert not (tmp_path / "out").exists()  # refused before anything was written: no lock, no folder
    dev = tmp_path / "dev.tsv"
    dev.write_text("sentence\tlabel\ngood\t1\nbad\tpositive?\n")
    done = run(*glue_command(tmp_path, "--model_name_or_path", str(minilm_path), "--validation_file", str(dev)))
    assert_one_line(done, 1, "run_glue.py: error:", "dev.tsv, line 3: label 'positive?' is not one of")


@pytest.mark.slow
def test_run_glue_argparse_error_is_two_lines(tmp_path):
    done = run(sys.executable, str(ROOT / "scripts" / "run_glue.py"), "--task_name", "sst2")
    last = assert_one_line(done, 2, "run_glue.py: error: the following arguments are required: --output_dir", lines=2)
    assert done.stderr.splitlines()[0] == "usage: run_glue.py ... (all options: run_glue.py --help)", last


@pytest.mark.slow
def test_accelerate_launch_cpu_with_two_processes_is_refused_once(tmp_path, minilm_path):
    """`accelerate launch --cpu --num_processes 2` starts one process that expects MPI: refused in one line.
    accelerate's launcher adds its own traceback of the failed child unless it runs with -q (--quiet)."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_machines", "1"]
    launch += ["--mixed_precision", "no", "--dynamo_backend", "no", "--cpu", "--num_processes", "2"]
    done = run(*launch, *glue_command(tmp_path, "--model_name_or_path", str(minilm_path))[1:])
    line = assert_one_line(done, 1, "run_glue.py: error: this process was launched for distributed training")
    assert done.stderr.count(line) == 1
    assert not (tmp_path / "out").exists()
