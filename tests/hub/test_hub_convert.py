"""``sinkhorn_hf.hub.convert`` / ``sinkhorn-hf convert``: new config, unchanged weights, clear refusals."""

from __future__ import annotations

import filecmp
import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from hub_helpers import logits, save_tiny_bert, text_batch
from safetensors.torch import load_file

from sinkhorn_hf import SinkhornSettings, UnsupportedModelError
from sinkhorn_hf.cli import main
from sinkhorn_hf.compat import config_attn_implementation
from sinkhorn_hf.hub import ConversionError, convert
from sinkhorn_hf.hub.convert import CONVERSION_RECORD


def test_k1_conversion_computes_what_the_original_computes(tiny_bert, tmp_path):
    out = tmp_path / "converted"
    report = convert(tiny_bert, out, iterations=1)

    # Weights: the same bytes, hence the same tensors.
    assert filecmp.cmp(tiny_bert / "model.safetensors", out / "model.safetensors", shallow=False)
    original, converted = load_file(tiny_bert / "model.safetensors"), load_file(out / "model.safetensors")
    assert original.keys() == converted.keys() and all(torch.equal(original[k], converted[k]) for k in original)
    # Tokenizer files copied unchanged and the tokenizer gives the same ids.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert filecmp.cmp(tiny_bert / name, out / name, shallow=False)
    inputs = text_batch(tiny_bert)
    assert torch.equal(text_batch(out)["input_ids"], inputs["input_ids"])
    assert (inputs["attention_mask"] == 0).any()  # the batch is padded

    saved = json.loads((out / "config.json").read_text())
    assert saved["attn_implementation"] == "sinkhorn"
    assert saved["sinkhorn_iterations"] == 1 and saved["sinkhorn_tolerance"] is None
    # Nothing else in the config changed.
    before = json.loads((tiny_bert / "config.json").read_text())
    settings = {f"sinkhorn_{name}": value for name, value in asdict(SinkhornSettings(iterations=1)).items()}
    assert {k: v for k, v in saved.items() if k not in before} == {"attn_implementation": "sinkhorn", **settings}
    assert all(saved[k] == v for k, v in before.items())

    # Loads as Sinkhorn with no argument, and K=1 Sinkhorn is SoftMax: eager attention of the original.
    from transformers import AutoModelForSequenceClassification

    assert config_attn_implementation(AutoModelForSequenceClassification.from_pretrained(out).config) == "sinkhorn"
    expected = logits(tiny_bert, inputs, attn_implementation="eager")
    torch.testing.assert_close(logits(out, inputs), expected, rtol=1e-5, atol=1e-6)
    assert report.copied == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "sinkhorn_conversion.json",
    ]
    record = json.loads((out / "sinkhorn_conversion.json").read_text())
    assert record["source"] == str(tiny_bert.resolve()) and record["sinkhorn_iterations"] == 1


def test_relative_source_is_recorded_as_absolute(tiny_bert, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_bert.parent)
    convert(tiny_bert.name, tmp_path / "out", iterations=1)
    record = json.loads((tmp_path / "out" / "sinkhorn_conversion.json").read_text())
    assert record["source"] == str(tiny_bert.resolve()) and record["revision"] is None


def test_more_iterations_change_the_outputs(tiny_bert, tmp_path):
    """The converted model really runs Sinkhorn: with K=5 its columns are normalised, so outputs move."""
    convert(tiny_bert, tmp_path / "k5", iterations=5, tolerance=1e-4)
    config = json.loads((tmp_path / "k5" / "config.json").read_text())
    assert config["sinkhorn_iterations"] == 5 and config["sinkhorn_tolerance"] == 1e-4
    inputs = text_batch(tiny_bert)
    difference = (logits(tmp_path / "k5", inputs) - logits(tiny_bert, inputs, attn_implementation="eager")).abs()
    assert difference.max() > 1e-4


def test_sharded_checkpoint_keeps_every_shard(tmp_path):
    source = save_tiny_bert(tmp_path / "sharded", max_shard_size="40KB")
    shards = sorted(p.name for p in source.glob("model-*.safetensors"))
    assert len(shards) > 1 and not (source / "model.safetensors").exists()
    report = convert(source, tmp_path / "out", iterations=1)
    assert report.copied[1:-1] == ["model.safetensors.index.json", *shards, "tokenizer.json", "tokenizer_config.json"]
    for name in ["model.safetensors.index.json", *shards]:
        assert filecmp.cmp(source / name, tmp_path / "out" / name, shallow=False)
    inputs = text_batch(source)
    torch.testing.assert_close(
        logits(tmp_path / "out", inputs), logits(source, inputs, attn_implementation="eager"), rtol=1e-5, atol=1e-6
    )


def test_vision_model_keeps_its_image_processor(tmp_path):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    source = tmp_path / "vit"
    config = ViTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    ViTForImageClassification(config).save_pretrained(source)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(source)
    # Files convert does not need are reported, not copied.
    (source / "README.md").write_text("original card")
    report = convert(source, tmp_path / "out", iterations=1)
    assert filecmp.cmp(source / "preprocessor_config.json", tmp_path / "out" / "preprocessor_config.json")
    assert report.not_copied == ["README.md"] and not (tmp_path / "out" / "README.md").exists()

    from transformers import AutoModelForImageClassification

    pixels = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        original = AutoModelForImageClassification.from_pretrained(source, attn_implementation="eager").eval()
        converted = AutoModelForImageClassification.from_pretrained(tmp_path / "out").eval()
        assert config_attn_implementation(converted.config) == "sinkhorn"
        torch.testing.assert_close(converted(pixels).logits, original(pixels).logits, rtol=1e-5, atol=1e-6)


def test_existing_output_needs_overwrite_and_is_then_replaced(tiny_bert, tmp_path):
    out = tmp_path / "out"
    convert(tiny_bert, out, iterations=1)
    (out / "stale.bin").write_text("from an earlier run")
    with pytest.raises(ConversionError, match="not empty.*--overwrite"):
        convert(tiny_bert, out, iterations=1)
    assert (out / "stale.bin").read_text() == "from an earlier run"  # untouched
    convert(tiny_bert, out, iterations=3, overwrite=True)
    assert not (out / "stale.bin").exists() and (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["sinkhorn_iterations"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or set-aside folder left
    # An empty existing directory is fine without --overwrite.
    (tmp_path / "empty").mkdir()
    convert(tiny_bert, tmp_path / "empty", iterations=1)


def folder_bytes(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_overwrite_refuses_a_folder_that_is_not_a_conversion(tiny_bert, tmp_path):
    out = tmp_path / "notes"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with pytest.raises(ConversionError, match="not an earlier conversion output .*sinkhorn_conversion.json"):
        convert(tiny_bert, out, iterations=1, overwrite=True)
    assert folder_bytes(out) == {"thesis.tex": b"years of work"}


def test_overwrite_in_the_current_directory_deletes_nothing(tiny_bert, tmp_path, monkeypatch, capsys):
    """The reported case: `sinkhorn-hf convert SRC . --overwrite` in a folder holding other files."""
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("keep me")
    (work / CONVERSION_RECORD).write_text("{}")  # even a folder that looks like a conversion
    before = folder_bytes(work)
    monkeypatch.chdir(work / "sub")
    for out in (".", str(work / "sub"), "..", str(tmp_path)):
        with pytest.raises(SystemExit, match="is the current directory .* or a folder above it"):
            main(["convert", str(tiny_bert), out, "--overwrite"])
    monkeypatch.setenv("HOME", str(work))
    monkeypatch.chdir(tmp_path.parent)
    with pytest.raises(ConversionError, match="is the home directory"):
        convert(tiny_bert, work, iterations=1, overwrite=True)
    assert folder_bytes(work) == before and sorted(p.name for p in tmp_path.iterdir()) == ["work"]


def test_refuses_an_output_inside_its_source(tmp_path):
    source = save_tiny_bert(tmp_path / "model")
    before = folder_bytes(source)
    with pytest.raises(ConversionError, match="is inside the source .* would change the source"):
        convert(source, source / "sinkhorn", iterations=1)
    assert folder_bytes(source) == before


def test_failed_conversion_leaves_the_output_as_it_was(tiny_bert, tmp_path, monkeypatch):
    out = tmp_path / "out"
    convert(tiny_bert, out, iterations=1)
    (out / "README.md").write_text("a card written afterwards")
    before = folder_bytes(out)
    copies, copyfile = [], shutil.copyfile

    def copy_then_fail(source, target):  # the first file lands in the staging folder, the second fails
        if copies:
            raise OSError(28, "No space left on device")
        copies.append(copyfile(source, target))

    monkeypatch.setattr(shutil, "copyfile", copy_then_fail)
    with pytest.raises(OSError, match="No space left"):
        convert(tiny_bert, out, iterations=3, overwrite=True)
    assert copies and folder_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the staging folder is gone too

    monkeypatch.undo()
    failures = iter([OSError(5, "Input/output error")])
    rename = Path.rename

    def rename_failing_once_into_place(self, target):  # OUT is set aside, then the staging rename fails
        if Path(target) == out and self.name.startswith(".out.") and ".previous." not in self.name:
            raise next(failures)
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", rename_failing_once_into_place)
    with pytest.raises(OSError, match="Input/output error"):
        convert(tiny_bert, out, iterations=3, overwrite=True)
    assert folder_bytes(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def truncate(path: Path, size: int) -> None:
    path.write_bytes(path.read_bytes()[:size])


@pytest.mark.parametrize(
    "damage",
    [
        lambda s: truncate(s / "model.safetensors", (s / "model.safetensors").stat().st_size // 2),
        lambda s: truncate(s / "model.safetensors", 4),
    ],
    ids=["half", "4-bytes"],
)
def test_truncated_weights_exit_non_zero_and_leave_the_output_byte_for_byte(tiny_bert, tmp_path, damage):
    """The reported case: a cut model.safetensors converted with exit 0, and --overwrite put it over a good OUT."""
    out, source = tmp_path / "out", tmp_path / "cut"
    convert(tiny_bert, out, iterations=1)
    before = folder_bytes(out)
    shutil.copytree(tiny_bert, source)
    damage(source)
    with pytest.raises(SystemExit, match=r"convert: error: .*cut: the weights file model.safetensors cannot be read, "
                       r"it is truncated or damaged \(SafetensorError: .*\); .*out was left as it was"):  # fmt: skip
        main(["convert", str(source), str(out), "--iterations", "3", "--overwrite"])
    assert folder_bytes(out) == before
    with pytest.raises(ConversionError, match="model.safetensors cannot be read"):
        convert(source, tmp_path / "fresh", iterations=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cut", "out"]  # no staging folder, no fresh output


def test_a_truncated_shard_is_refused_naming_it(tmp_path):
    source = save_tiny_bert(tmp_path / "sharded", max_shard_size="40KB")
    last = sorted(source.glob("model-*.safetensors"))[-1]
    truncate(last, last.stat().st_size - 1)
    with pytest.raises(ConversionError, match=f"the weights file {last.name} cannot be read"):
        convert(source, tmp_path / "out", iterations=1)
    (source / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(ConversionError, match="model.safetensors.index.json is not a readable weight index"):
        convert(source, tmp_path / "out", iterations=1)
    assert not (tmp_path / "out").exists()


def test_truncated_pytorch_bin_weights_are_refused(tiny_bert, tmp_path):
    source = tmp_path / "bin"
    shutil.copytree(tiny_bert, source)
    torch.save(load_file(source / "model.safetensors"), source / "pytorch_model.bin")
    (source / "model.safetensors").unlink()
    convert(source, tmp_path / "good", iterations=1)  # the whole .bin converts
    truncate(source / "pytorch_model.bin", 1000)
    with pytest.raises(ConversionError, match="the weights file pytorch_model.bin cannot be read"):
        convert(source, tmp_path / "out", iterations=1)


def test_missing_model_is_a_clear_error(tmp_path, monkeypatch):
    with pytest.raises(ConversionError, match="does not exist"):
        convert(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConversionError, match="no config.json"):
        convert(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(ConversionError, match="neither an existing directory nor a Hub model id"):
        convert("not a//model", tmp_path / "out")
    # A Hub id that cannot be fetched (offline, empty cache) names the model and why.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ConversionError, match="'nobody/no-such-model'.*could not be downloaded"):
        convert("nobody/no-such-model", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_checkpoint_without_weights_is_refused(tiny_bert, tmp_path):
    source = tmp_path / "config-only"
    source.mkdir()
    (source / "config.json").write_text((tiny_bert / "config.json").read_text())
    with pytest.raises(ConversionError, match="no PyTorch weights"):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["config-only"]


@pytest.mark.parametrize("model_type", ["gpt2", "deberta-v2", "clip"])
def test_unsupported_family_is_refused(model_type, tmp_path):
    from transformers import AutoConfig

    AutoConfig.for_model(model_type).save_pretrained(tmp_path / model_type)
    with pytest.raises(UnsupportedModelError, match=model_type):
        convert(tmp_path / model_type, tmp_path / "out")


def test_decoder_configuration_is_refused(tmp_path):
    source = save_tiny_bert(tmp_path / "decoder", is_decoder=True)
    with pytest.raises(ConversionError, match="would not load with Sinkhorn attention.*decoder"):
        convert(source, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_iterations_are_refused(tiny_bert, tmp_path):
    with pytest.raises(ConversionError, match="sinkhorn_iterations must be an int >= 1"):
        convert(tiny_bert, tmp_path / "out", iterations=0)


def test_reconversion_keeps_other_sinkhorn_settings(tiny_bert, tmp_path):
    convert(tiny_bert, tmp_path / "first", iterations=3)
    config = json.loads((tmp_path / "first" / "config.json").read_text())
    config["sinkhorn_backward"] = "implicit"
    (tmp_path / "first" / "config.json").write_text(json.dumps(config))
    report = convert(tmp_path / "first", tmp_path / "second", iterations=5)
    assert report.settings == SinkhornSettings(iterations=5, backward="implicit")
    second = json.loads((tmp_path / "second" / "config.json").read_text())
    assert second["sinkhorn_iterations"] == 5 and second["sinkhorn_backward"] == "implicit"


def test_cli_converts_and_reports(tiny_bert, tmp_path, capsys):
    out = tmp_path / "cli-out"
    assert main(["convert", str(tiny_bert), str(out), "--iterations", "1"]) == 0
    printed = capsys.readouterr().out
    assert f"-> {out}" in printed and "iterations=1" in printed and "model.safetensors" in printed
    record = json.loads((out / "sinkhorn_conversion.json").read_text())
    assert record["command"] == f"sinkhorn-hf convert {tiny_bert} {out} --iterations 1"
    with pytest.raises(SystemExit, match="sinkhorn-hf convert: error: .*not empty"):
        main(["convert", str(tiny_bert), str(out), "--iterations", "1"])
