"""A Sinkhorn checkpoint → one ONNX file (dynamic batch and sequence axes), checked in ONNX Runtime against PyTorch.

The model is loaded with ``attn_implementation="sinkhorn"`` and the ``sinkhorn_*`` settings of its config, exported
with ``torch.onnx.export(..., dynamo=True)``, run in ONNX Runtime on a padded sample batch and on a second shape,
and written (atomically) only if every output agrees with PyTorch within the tolerance.
"""

from __future__ import annotations

import inspect
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEFAULT_TOLERANCE = 1e-4
SAMPLE_LENGTH = 16  # tokens in the longest sample sequence (fewer when the model has fewer positions)


class ExportError(ValueError):
    """The checkpoint could not be exported, or the ONNX model does not compute what PyTorch computes."""


@dataclass(frozen=True)
class ExportReport:
    """``output``: the ONNX file written; ``inputs``/``outputs``: its tensor names; ``dynamic_axes``: per input,
    the axes that may vary; ``max_abs_diff``: the largest |ONNX Runtime − PyTorch| over all outputs and checks;
    ``settings``: the Sinkhorn settings exported (iterations K, ...)."""

    source: str
    output: Path
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    dynamic_axes: dict[str, tuple[str, ...]]
    max_abs_diff: float
    settings: Any


def export_onnx(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    overwrite: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
) -> ExportReport:
    """Export the checkpoint at ``source`` (a folder or Hub id) to the ONNX file ``output``; refuse to replace an
    existing file unless ``overwrite``. Raises :class:`ExportError` with what was wrong."""
    import transformers

    from ..attention.settings import SinkhornSettings
    from .model_kind import model_kind

    output = Path(output)
    _check_output(output, overwrite)
    try:
        config = transformers.AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as error:
        raise ExportError(f"cannot read a transformers config from {source}: {error}") from error
    kind = model_kind(config)
    auto_class = getattr(transformers, kind.auto_class)
    # ONNX holds standard operators only: the PyTorch routes, never the fused Triton kernels a GPU would pick.
    model = auto_class.from_pretrained(source, attn_implementation="sinkhorn", sinkhorn_backend="torch").eval()
    sample, dynamic_shapes = _sample_inputs(model, kind.is_text)
    with torch.no_grad():
        reference = model(**sample)
    output_names = tuple(reference.keys())
    with tempfile.TemporaryDirectory(prefix=f".{output.name}.", dir=output.parent) as scratch:
        staged = Path(scratch) / output.name
        try:
            with torch.no_grad():  # an inference graph
                program = torch.onnx.export(
                    model,
                    (),
                    kwargs=sample,
                    dynamo=True,
                    dynamic_shapes=dynamic_shapes,
                    output_names=list(output_names),
                )
            program.save(staged)
        except Exception as error:  # torch.export raises many types; the first lines say what failed
            raise ExportError(f"torch.onnx.export of {source} failed: {_first_lines(error)}") from error
        difference = max(
            _max_difference(staged, model, inputs, output_names) for inputs in (sample, _other_shape(sample))
        )
        if not difference <= tolerance:
            raise ExportError(
                f"the exported model differs from PyTorch by {difference:.3g} (tolerance {tolerance:g}); "
                f"nothing was written to {output}"
            )
        for staged_file in sorted(Path(scratch).iterdir(), key=lambda path: path == staged):  # the .onnx last
            os.replace(staged_file, output.parent / staged_file.name)
    return ExportReport(
        source=str(source),
        output=output,
        inputs=tuple(sample),
        outputs=output_names,
        dynamic_axes={name: tuple(dim.__name__ for dim in axes.values()) for name, axes in dynamic_shapes.items()},
        max_abs_diff=difference,
        settings=SinkhornSettings.from_config(model.config),
    )


def _check_output(output: Path, overwrite: bool) -> None:
    if output.suffix != ".onnx":
        raise ExportError(f"the output must be a .onnx file, got {output}")
    if not output.parent.is_dir():
        raise ExportError(f"the folder of {output} does not exist")
    if output.is_dir():
        raise ExportError(f"{output} is a folder; give the path of the .onnx file to write")
    existing = [path for path in (output, output.with_name(output.name + ".data")) if path.exists()]
    if existing and not overwrite:
        raise ExportError(f"{existing[0]} exists; pass --overwrite (overwrite=True) to replace it")


def _sample_inputs(model: torch.nn.Module, is_text: bool) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """A padded batch of two (text: the second sequence half as long) and the dynamic axes of each input."""
    config = model.config
    generator = torch.Generator().manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=1024)
    if not is_text:
        size = config.image_size if isinstance(config.image_size, int) else tuple(config.image_size)
        height, width = (size, size) if isinstance(size, int) else size
        pixels = torch.randn(2, config.num_channels, height, width, generator=generator)
        return {"pixel_values": pixels}, {"pixel_values": {0: batch}}
    length = min(SAMPLE_LENGTH, config.max_position_embeddings)
    sequence = torch.export.Dim("sequence", min=2, max=config.max_position_embeddings)
    attention_mask = (torch.arange(length)[None] < torch.tensor([length, length // 2])[:, None]).long()
    input_ids = torch.randint(3, config.vocab_size, (2, length), generator=generator) * attention_mask
    sample = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "token_type_ids" in inspect.signature(model.forward).parameters:
        sample["token_type_ids"] = torch.zeros_like(input_ids)
    return sample, {name: {0: batch, 1: sequence} for name in sample}


def _other_shape(sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The sample at another batch size (and, for text, sequence length): proves the axes are dynamic."""
    if "pixel_values" in sample:
        return {"pixel_values": torch.cat([sample["pixel_values"], sample["pixel_values"].flip(0)])}
    return {name: torch.cat([tensor, tensor[:1]])[:, : tensor.shape[1] - 3] for name, tensor in sample.items()}


def _max_difference(path: Path, model: torch.nn.Module, inputs: dict[str, torch.Tensor], names) -> float:
    """max |ONNX Runtime − PyTorch| over every output of ``model(**inputs)``."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {name: tensor.numpy() for name, tensor in inputs.items()}
    ours = session.run(list(names), feed)
    with torch.no_grad():
        expected = model(**inputs)
    return max(
        float((torch.from_numpy(got) - expected[name]).abs().max()) for got, name in zip(ours, names, strict=True)
    )


def _first_lines(error: Exception, lines: int = 6) -> str:
    return "\n".join(str(error).strip().splitlines()[:lines])
