"""Image classification fine-tuning (ViT family): a Hub dataset, an image folder, or an ``.npz`` of arrays.

Images stay raw in the dataset; the collator runs the model's image processor on each batch after
converting every image to the model's channel count (grayscale <-> RGB).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
import torch
from PIL import Image

from ..arguments import ModelArguments, require_at_least_one
from ..files import DataError, load_hub_dataset
from ..metrics import EvalOutput, classification_metrics
from ..run import Task, TaskData
from ..text import cuts, subsample

_NPZ_SPLITS = {"train": ("x_train", "y_train"), "test": ("x_test", "y_test"), "all": ("x", "y")}


@dataclass
class ImageDataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset with an image and a label column"})
    dataset_config_name: str | None = None
    train_dir: str | None = field(default=None, metadata={"help": "image folder: one sub-folder per class"})
    validation_dir: str | None = field(default=None, metadata={"help": "image folder for evaluation"})
    train_file: str | None = field(
        default=None, metadata={"help": ".npz with x_train/y_train (and x_test/y_test), or x/y; uint8 images"}
    )
    validation_file: str | None = field(default=None, metadata={"help": ".npz for evaluation (x_test/y_test or x/y)"})
    train_val_split: float = field(
        default=0.15, metadata={"help": "fraction of train held out when no evaluation split is given"}
    )
    image_column_name: str = "image"
    label_column_name: str = "label"
    max_train_samples: int | None = field(default=None, metadata={"help": "train on a seeded random subset"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "evaluate on a seeded random subset"})

    def __post_init__(self) -> None:
        sources = [s for s in (self.dataset_name, self.train_dir, self.train_file) if s is not None]
        if len(sources) != 1:
            raise ValueError("give exactly one data source: --dataset_name, --train_dir or --train_file (.npz)")
        if self.validation_dir is not None and self.train_dir is None:
            raise ValueError("--validation_dir goes with --train_dir")
        if self.validation_file is not None and self.train_file is None:
            raise ValueError("--validation_file goes with --train_file")
        if not 0.0 < self.train_val_split < 1.0:
            raise ValueError(f"--train_val_split must be in (0, 1), got {self.train_val_split}")
        require_at_least_one(max_train_samples=self.max_train_samples, max_eval_samples=self.max_eval_samples)

    @property
    def source(self) -> str | list[str]:
        if self.dataset_name is not None:
            return self.dataset_name
        files = [self.train_dir or self.train_file, self.validation_dir or self.validation_file]
        return [f for f in files if f is not None]


def _npz_split(path: str, wanted: tuple[str, ...], required: bool) -> datasets.Dataset | None:
    """The first of ``wanted`` (keys of _NPZ_SPLITS) present in the npz, as image/label columns."""
    with np.load(path) as arrays:
        found = [_NPZ_SPLITS[s] for s in wanted if all(k in arrays for k in _NPZ_SPLITS[s])]
        if not found:
            if required:
                keys = " or ".join("/".join(_NPZ_SPLITS[s]) for s in wanted)
                raise DataError(f"{path}: no {keys} arrays; it has {list(arrays)}")
            return None
        x_key, y_key = found[0]
        x, y = arrays[x_key], arrays[y_key]
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or len(x) != len(y):
        raise DataError(
            f"{path}: {x_key} must be uint8 images (N, H, W) or (N, H, W, C) with one label each in {y_key}; "
            f"got {x.dtype} {x.shape} and {y.shape}"
        )
    array = datasets.Array2D(x.shape[1:], "uint8") if x.ndim == 3 else datasets.Array3D(x.shape[1:], "uint8")
    features = datasets.Features({"image": array, "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"image": x, "label": y.astype(np.int64)}, features=features)


Splits = tuple[datasets.Dataset, datasets.Dataset | None, str]


def _from_npz(args: ImageDataArguments) -> Splits:
    train = _npz_split(args.train_file, ("train", "all"), required=True)
    if args.validation_file is not None:
        return train, _npz_split(args.validation_file, ("test", "all"), required=True), args.validation_file
    return train, _npz_split(args.train_file, ("test",), required=False), f"{args.train_file}: x_test/y_test"


def _from_folders(args: ImageDataArguments) -> Splits:
    train = datasets.load_dataset("imagefolder", data_dir=args.train_dir, split="train")
    if args.validation_dir is None:
        return train, None, ""
    validation = datasets.load_dataset("imagefolder", data_dir=args.validation_dir, split="train")
    names = train.features["label"].names, validation.features["label"].names
    if names[0] != names[1]:
        raise DataError(f"class folders differ: {args.train_dir} has {names[0]}, {args.validation_dir} has {names[1]}")
    return train, validation, args.validation_dir


def _from_hub(args: ImageDataArguments) -> Splits:
    hub = load_hub_dataset(
        args.dataset_name,
        args.dataset_config_name,
        local_flags="--train_dir/--validation_dir (image folders) or --train_file/--validation_file (.npz)",
    )
    split = next((s for s in ("validation", "test") if s in hub), None)
    return hub["train"], hub[split] if split else None, split or ""


def load_images(args: ImageDataArguments, seed: int) -> tuple[datasets.Dataset, datasets.Dataset, list[str], str]:
    """Train and evaluation sets with columns ``image`` and ``labels``, the class names, and what the
    evaluation set is."""
    loader = _from_hub if args.dataset_name else _from_folders if args.train_dir else _from_npz
    train, validation, eval_split = loader(args)
    if validation is None:
        parts = train.train_test_split(test_size=args.train_val_split, seed=seed)
        train, validation = parts["train"], parts["test"]
        eval_split = f"{args.train_val_split:g} of train held out (seed {seed})"
    columns = {args.image_column_name: "image", args.label_column_name: "labels"}
    for split in (train, validation):
        missing = [c for c in columns if c not in split.column_names]
        if missing:
            raise DataError(
                f"image data lacks column(s) {missing} (it has {split.column_names}); "
                "set --image_column_name/--label_column_name"
            )
    train, validation = (s.select_columns(list(columns)).rename_columns(columns) for s in (train, validation))
    feature = train.features["labels"]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    else:
        names = [str(i) for i in range(int(max(max(train["labels"]), max(validation["labels"]))) + 1)]
    return train, validation, names, eval_split


def to_channels(image: Any, num_channels: int) -> np.ndarray:
    """An (H, W, num_channels) uint8 array from a PIL image or an (H, W[, C]) uint8 array."""
    if isinstance(image, Image.Image):
        image = image.convert("RGB" if num_channels == 3 else "L")
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(f"expected an image of shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), got {array.shape}")
    array = array[..., :3]  # drop alpha
    if num_channels == 3 and array.shape[-1] == 1:
        return np.repeat(array, 3, axis=-1)
    if num_channels == 1 and array.shape[-1] == 3:
        return np.asarray(Image.fromarray(array).convert("L"))[..., None]
    if array.shape[-1] != num_channels:
        raise ValueError(f"the model takes {num_channels}-channel images, got {array.shape[-1]} channels")
    return array


class ImageCollator:
    """Rows of raw images -> what the image processor makes of them (``pixel_values`` (B, C, H, W); SigLIP2's
    variable-resolution processor adds ``pixel_attention_mask`` and ``spatial_shapes``), and ``labels`` (B,)."""

    def __init__(self, image_processor: Any, num_channels: int) -> None:
        self.image_processor = image_processor
        self.num_channels = num_channels

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        images = [to_channels(row["image"], self.num_channels) for row in rows]
        pixels = self.image_processor(images, return_tensors="pt", input_data_format="channels_last")
        return {**pixels, "labels": torch.tensor([row["labels"] for row in rows])}


def default_image_processor(config: Any) -> Any:
    """A processor for a model built from a config: resize to ``config.image_size`` (SigLIP2: at most
    ``num_patches`` patches of the vision tower, aspect ratio kept), scale to [-1, 1]."""
    from transformers import Siglip2ImageProcessorPil, ViTImageProcessorPil

    vision = getattr(config, "vision_config", None) or config
    channels = vision.num_channels
    if vision.model_type == "siglip2_vision_model":
        return Siglip2ImageProcessorPil(
            patch_size=vision.patch_size,
            max_num_patches=vision.num_patches,
            image_mean=[0.5] * channels,
            image_std=[0.5] * channels,
        )
    size = vision.image_size if isinstance(vision.image_size, int) else vision.image_size[0]
    return ViTImageProcessorPil(
        size={"height": size, "width": size}, image_mean=[0.5] * channels, image_std=[0.5] * channels
    )


def compute_image_metrics(output: EvalOutput) -> dict[str, float]:
    return classification_metrics(output)


def load_task_data(data_args: ImageDataArguments, model_args: ModelArguments, seed: int) -> TaskData:
    """Raw images (the collator processes them) and the pretrained image processor when there is one."""
    from transformers import AutoImageProcessor

    train, validation, names, eval_split = load_images(data_args, seed)
    processor_name = model_args.image_processor_name or model_args.model_name_or_path
    return TaskData(
        task_name="image-classification",
        dataset=data_args.source,
        eval_split=eval_split,
        train=subsample(train, data_args.max_train_samples, seed).with_format("numpy"),
        evals={"": subsample(validation, data_args.max_eval_samples, seed).with_format("numpy")},
        label_names=names,
        compute_metrics=compute_image_metrics,
        main_metric="accuracy",
        processor=AutoImageProcessor.from_pretrained(processor_name) if processor_name else None,
        info={"eval_subset": cuts(validation, data_args.max_eval_samples)},
    )


def image_collator(processor: Any, config: Any) -> ImageCollator:
    return ImageCollator(processor, (getattr(config, "vision_config", None) or config).num_channels)


IMAGES = Task(
    ImageDataArguments,
    "AutoModelForImageClassification",
    load_task_data,
    image_collator,
    default_processor=default_image_processor,
    # a pretrained head of another size is replaced by a fresh one (ignored when building from a config)
    load_kwargs={"ignore_mismatched_sizes": True},
)
