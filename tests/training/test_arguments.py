"""Every SinkhornSettings field is a flag of every fine-tuning script, read and checked by SinkhornSettings."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from sinkhorn_hf.attention.settings import SinkhornSettings
from sinkhorn_hf.training.arguments import SINKHORN_HELP, ModelArguments
from sinkhorn_hf.training.run import task_parser
from sinkhorn_hf.training.tasks.glue import GLUE
from sinkhorn_hf.training.tasks.images import IMAGES
from sinkhorn_hf.training.tasks.imdb import IMDB

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"
SETTINGS = [setting.name for setting in fields(SinkhornSettings)]


def test_every_setting_has_help():
    assert [name for name in SETTINGS if name not in SINKHORN_HELP] == []
    assert set(SINKHORN_HELP) <= set(SETTINGS), "help for a setting SinkhornSettings no longer has"


@pytest.mark.parametrize("task", [GLUE, IMDB, IMAGES], ids=["glue", "imdb", "images"])
def test_every_setting_is_a_flag_of_every_script(task):
    help_text = task_parser(task).format_help()
    for name in SETTINGS:
        assert f"--sinkhorn_{name} " in help_text and SINKHORN_HELP[name].split()[0] in help_text, name


def parse(*flags: str) -> ModelArguments:
    (model_args,) = task_parser(GLUE).parse_args_into_dataclasses(
        ["--model_type", "bert", "--task_name", "sst2", "--output_dir", "out", *flags], return_remaining_strings=True
    )[:1]
    return model_args


def test_flags_are_read_by_the_field_types():
    settings = parse(
        "--sinkhorn_iterations", "5", "--sinkhorn_tolerance", "1e-3", "--sinkhorn_backward", "implicit",
        "--sinkhorn_streaming", "true", "--sinkhorn_streaming_threshold", "64", "--sinkhorn_block_size", "16",
    ).sinkhorn_settings  # fmt: skip
    assert settings == SinkhornSettings(5, 1e-3, "implicit", True, 64, 16)
    assert parse().sinkhorn_settings == SinkhornSettings()
    assert (
        parse("--sinkhorn_streaming", "auto", "--sinkhorn_block_size", "none").sinkhorn_settings == SinkhornSettings()
    )
    assert ModelArguments(model_type="bert", sinkhorn_tolerance=0.5).sinkhorn_settings.tolerance == 0.5


@pytest.mark.parametrize(
    "name, text, value",
    [
        ("iterations", "0", 0),
        ("iterations", "three", "three"),
        ("tolerance", "-1", -1.0),
        ("backward", "adjoint", "adjoint"),
        ("streaming", "sometimes", "sometimes"),
        ("streaming_threshold", "none", "none"),
        ("block_size", "0", 0),
    ],
)
def test_bad_flags_fail_with_the_settings_own_message(name, text, value):
    with pytest.raises(ValueError) as from_settings:
        SinkhornSettings(**{name: value})
    with pytest.raises(ValueError) as from_flags:
        parse(f"--sinkhorn_{name}", text)
    assert str(from_flags.value) == str(from_settings.value)


@pytest.mark.slow
@pytest.mark.parametrize("script", ["run_glue.py", "run_imdb.py", "run_image_classification.py"])
def test_scripts_show_every_setting(script):
    done = subprocess.run([sys.executable, str(SCRIPTS / script), "--help"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [name for name in SETTINGS if f"--sinkhorn_{name} " not in done.stdout] == []
