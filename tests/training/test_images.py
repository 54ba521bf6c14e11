"""Image classification: npz arrays and image folders, grayscale/RGB conversion, ViT / I-JEPA / ViT-MSN built from
a config."""

from __future__ import annotations

import numpy as np
import pytest
import transformers
from PIL import Image
from transformers import HfArgumentParser

from sinkhorn_hf.compat import config_attn_implementation
from sinkhorn_hf.training.arguments import ModelArguments, TrainerArguments
from sinkhorn_hf.training.run import run_task
from sinkhorn_hf.training.tasks.images import IMAGES, ImageDataArguments, load_images, to_channels

VIT = "image_size=12,patch_size=4,hidden_size=32,num_hidden_layers=2,num_attention_heads=4,intermediate_size=64"


def quadrant_images(n: int, seed: int, size: int = 12) -> tuple[np.ndarray, np.ndarray]:
    """Gray noise with one bright quadrant; the quadrant (0-3) is the class."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    images = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
    half = size // 2
    for image, label in zip(images, labels, strict=True):
        row, col = divmod(int(label), 2)
        image[row * half : (row + 1) * half, col * half : (col + 1) * half] += 180
    return images, labels.astype(np.uint8)


def parse(*flags: str):
    parser = HfArgumentParser((ModelArguments, ImageDataArguments, TrainerArguments))
    return parser.parse_args_into_dataclasses(list(flags))


@pytest.mark.parametrize(
    "model_type",
    ["vit", pytest.param("ijepa", marks=pytest.mark.slow), pytest.param("vit_msn", marks=pytest.mark.slow)],
)
def test_model_from_config_learns_grayscale_npz(model_type, tmp_path):
    x_train, y_train = quadrant_images(160, 0)
    x_test, y_test = quadrant_images(37, 1)
    npz = tmp_path / "quadrants.npz"
    np.savez_compressed(npz, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    result = run_task(
        IMAGES,
        *parse(
            "--model_type", model_type, "--config_overrides", VIT, "--train_file", str(npz), "--output_dir",
            str(tmp_path / "out"), "--attn_implementation", "sinkhorn", "--num_train_epochs", "4",
            "--learning_rate", "2e-3", "--per_device_train_batch_size", "16",
        )
    )  # fmt: skip
    assert result.eval_split == f"{npz}: x_test/y_test"
    assert result.num_eval_samples == {"num_samples": 37}
    assert result.model_name_or_path == f"{model_type} (random init)" and result.config_overrides == VIT
    assert result.metrics["accuracy"] > 0.9
    model = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "out")
    assert config_attn_implementation(model.config) == "sinkhorn" and model.config.model_type == model_type
    # the processor made for the config is saved with the model
    assert (tmp_path / "out" / "preprocessor_config.json").exists()


def test_image_folder_with_holdout_and_lora(tmp_path):
    x, y = quadrant_images(40, 2)
    names = ["top_left", "top_right", "bottom_left", "bottom_right"]
    for i, (image, label) in enumerate(zip(x, y, strict=True)):
        folder = tmp_path / "images" / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        mode = "RGB" if i % 2 else "L"  # a mix of colour and grayscale files
        Image.fromarray(image).convert(mode).save(folder / f"{i}.png")
    result = run_task(
        IMAGES,
        *parse(
            "--model_type", "vit", "--config_overrides", VIT, "--train_dir", str(tmp_path / "images"),
            "--train_val_split", "0.25", "--output_dir", str(tmp_path / "out"), "--max_train_steps", "3",
            "--lora_r", "2",
        )
    )  # fmt: skip
    assert result.num_eval_samples == {"num_samples": 10} and result.num_train_samples == 30
    assert result.eval_split == "0.25 of train held out (seed 42)"
    assert result.lora["target_modules"] == ["q_proj", "v_proj"]
    train, _, label_names, _ = load_images(ImageDataArguments(train_dir=str(tmp_path / "images")), seed=0)
    assert sorted(label_names) == sorted(names)


def test_to_channels():
    gray = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert np.array_equal(to_channels(gray, 3), np.stack([gray] * 3, axis=-1))
    assert np.array_equal(to_channels(gray, 1), gray[..., None])
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    assert np.array_equal(to_channels(rgba, 3), rgba[..., :3])
    rgb = np.random.default_rng(0).integers(0, 256, (4, 5, 3)).astype(np.uint8)
    expected = np.asarray(Image.fromarray(rgb).convert("L"))  # ITU-R 601-2 luma, as PIL computes it
    assert np.array_equal(to_channels(rgb, 1)[..., 0], expected)
    assert np.array_equal(to_channels(Image.fromarray(gray), 3), np.stack([gray] * 3, axis=-1))
    with pytest.raises(ValueError, match=r"expected an image of shape .* got \(2, 3, 5\)"):
        to_channels(np.zeros((2, 3, 5), np.uint8), 3)


def test_npz_must_hold_uint8_images(tmp_path):
    path = tmp_path / "floats.npz"
    np.savez(path, x=np.zeros((4, 8, 8), np.float32), y=np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="x must be uint8 images"):
        load_images(ImageDataArguments(train_file=str(path)), seed=0)
    np.savez(path, images=np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"no x_train/y_train or x/y arrays; it has \['images'\]"):
        load_images(ImageDataArguments(train_file=str(path)), seed=0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(), "exactly one data source"),
        (dict(train_dir="a", train_file="b.npz"), "exactly one data source"),
        (dict(train_file="b.npz", validation_dir="c"), "--validation_dir goes with --train_dir"),
        (dict(train_dir="a", train_val_split=1.0), r"must be in \(0, 1\)"),
    ],
)
def test_bad_image_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageDataArguments(**kwargs)


@pytest.mark.slow
def test_siglip2_from_a_config_file_learns_with_variable_resolution_patches(tmp_path):
    # SigLIP2's processor makes patches with a padding mask and their grid shape: all must reach the model
    x_train, y_train = quadrant_images(160, 0)
    x_test, y_test = quadrant_images(37, 1)
    npz = tmp_path / "quadrants.npz"
    np.savez_compressed(npz, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    tower = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    config = transformers.Siglip2Config(
        text_config=dict(tower, vocab_size=99, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        vision_config=dict(tower, patch_size=4, num_patches=9),
    )
    config.save_pretrained(tmp_path / "config")
    result = run_task(
        IMAGES,
        *parse(
            "--model_type", "siglip2", "--config_name", str(tmp_path / "config"), "--train_file", str(npz),
            "--output_dir", str(tmp_path / "out"), "--attn_implementation", "sinkhorn", "--num_train_epochs", "4",
            "--learning_rate", "2e-3", "--per_device_train_batch_size", "16",
        )
    )  # fmt: skip
    assert result.metrics["accuracy"] > 0.9
    model = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "out")
    assert type(model).__name__ == "Siglip2ForImageClassification"
    assert config_attn_implementation(model.config.vision_config) == "sinkhorn"
