"""Turn a pretrained checkpoint into a Sinkhorn one: new config.json, weights and tokenizer copied byte for byte.

The converted directory loads with ``import sinkhorn_hf; AutoModel.from_pretrained(OUT)`` and runs Sinkhorn
attention with the saved settings; with ``iterations=1`` it computes exactly what the original computes.
Everything is written into a staging folder and checked there (config reloaded, model built, every weight tensor
read back) before it replaces OUT, so a truncated or damaged source leaves OUT as it was.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..attention.settings import DEFAULT_ITERATIONS, SinkhornSettings
from ..compat import model_from_config
from ..families import UnsupportedModelError, check_supported
from .model_kind import ModelKind, model_kind

CONVERSION_RECORD = "sinkhorn_conversion.json"
CONFIG_NAME = "config.json"

# transformers loads safetensors when present, so only the .bin files of a checkpoint without them are needed.
_SAFETENSORS = ("model.safetensors", "model.safetensors.index.json")
_TORCH_BIN = ("pytorch_model.bin", "pytorch_model.bin.index.json")
# Tokenizer and processor files of the families sinkhorn_hf supports (WordPiece, BPE, SentencePiece, images).
PREPROCESSOR_PATTERNS = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "*.model",
    "preprocessor_config.json",
    "processor_config.json",
)


class ConversionError(ValueError):
    """The source cannot be converted (missing, not a transformers checkpoint, or the output is in the way)."""


@dataclass
class ConversionReport:
    """What :func:`convert` did. ``revision`` is the Hub commit for a Hub source, None for a local one."""

    output_dir: Path
    source: str
    revision: str | None
    settings: SinkhornSettings
    copied: list[str] = field(default_factory=list)
    not_copied: list[str] = field(default_factory=list)


def convert(
    source: str | Path,
    output_dir: str | Path,
    iterations: int = DEFAULT_ITERATIONS,
    tolerance: float | None = None,
    overwrite: bool = False,
    command: str | None = None,
) -> ConversionReport:
    """Write a Sinkhorn copy of ``source`` (a local directory or a Hub model id) into ``output_dir``.

    config.json gets ``"attn_implementation": "sinkhorn"``, ``sinkhorn_iterations`` and ``sinkhorn_tolerance``;
    weights, tokenizer and processor files are copied unchanged; ``sinkhorn_conversion.json`` records the source
    (and ``command``, the command line that asked for it). ``overwrite=True`` replaces a non-empty
    ``output_dir`` that an earlier conversion wrote (see :func:`_check_output` for what is always refused).
    Raises :class:`ConversionError` or
    :class:`~sinkhorn_hf.UnsupportedModelError`.
    """
    try:
        SinkhornSettings(iterations=iterations, tolerance=tolerance)
    except ValueError as error:
        raise ConversionError(str(error)) from None
    target = _check_output(Path(output_dir))
    if Path(source).expanduser().exists():  # a local source is checked before anything else is read
        _check_not_source(target, Path(source).expanduser(), output_dir)
    _check_replaceable(target, output_dir, overwrite)
    source_dir, revision = _resolve_source(str(source))
    _check_not_source(target, source_dir, output_dir)

    config_dict, config, kind = _read_config(source_dir, str(source))
    # Settings the source already has (re-converting a Sinkhorn checkpoint) are kept unless asked for here.
    settings = replace(SinkhornSettings.from_config(config), iterations=iterations, tolerance=tolerance)
    weights = _weight_files(source_dir, str(source))
    preprocessors = sorted(
        path.name
        for path in source_dir.iterdir()
        if path.is_file() and any(fnmatch.fnmatch(path.name, p) for p in PREPROCESSOR_PATTERNS)
    )
    copied = [CONFIG_NAME, *weights, *preprocessors]
    not_copied = sorted(p.name for p in source_dir.iterdir() if p.name not in copied and not p.name.startswith("."))

    config_dict["attn_implementation"] = "sinkhorn"
    config_dict.update({f"sinkhorn_{name}": value for name, value in asdict(settings).items()})
    record = {
        # A Hub id, or the absolute local path so the record still points there from another directory.
        "source": str(source) if revision else str(source_dir.resolve()),
        "revision": revision,
        **{f"sinkhorn_{name}": value for name, value in asdict(settings).items()},
        "command": command,
        "copied": copied,
    }

    target.parent.mkdir(parents=True, exist_ok=True)
    # Build next to the target and swap in at the end: a failed conversion leaves OUT as it was.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; OUT should get the usual permissions
        (staging / CONFIG_NAME).write_text(json.dumps(config_dict, indent=2) + "\n")
        _copy_files(source_dir, staging, [*weights, *preprocessors])
        (staging / CONVERSION_RECORD).write_text(json.dumps(record, indent=2) + "\n")
        _verify(staging, settings, kind.auto_class)
        _check_weights(staging, weights, str(source), output_dir)
        _swap_into_place(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return ConversionReport(Path(output_dir), str(source), revision, settings, copied + [CONVERSION_RECORD], not_copied)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _check_output(output_dir: Path) -> Path:
    """The resolved ``output_dir``; refused: a link, a file, the current directory, the home directory or a
    folder above either (convert replaces its output folder as a whole)."""
    if output_dir.is_symlink():
        raise ConversionError(f"output {output_dir} is a symbolic link; give the folder it points to")
    out = output_dir.resolve()
    protected_dirs = {"the current directory": Path.cwd().resolve(), "the home directory": Path.home().resolve()}
    for what, protected in protected_dirs.items():
        if protected.is_relative_to(out):
            raise ConversionError(
                f"output directory {output_dir} is {what} ({protected}) or a folder above it; convert replaces "
                "its output folder as a whole, so give a new or empty subdirectory, e.g. OUT=./converted"
            )
    if out.exists() and not out.is_dir():
        raise ConversionError(f"output {output_dir} exists and is not a directory")
    return out


def _check_replaceable(out: Path, output_dir: Path, overwrite: bool) -> None:
    """A non-empty output is replaced only with ``overwrite`` and only when it is an earlier conversion output
    (it has the record), so nothing convert did not write is deleted."""
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ConversionError(
                f"output directory {output_dir} exists and is not empty; pass --overwrite (overwrite=True) to "
                "replace an earlier conversion there, or choose another directory"
            )
        if not (out / CONVERSION_RECORD).is_file():
            raise ConversionError(
                f"output directory {output_dir} is not empty and is not an earlier conversion output (it has no "
                f"{CONVERSION_RECORD}): --overwrite only replaces an empty folder or one that `sinkhorn-hf convert` "
                "wrote; move its files away or choose another directory"
            )


def _check_not_source(target: Path, source_dir: Path, output_dir: Path) -> None:
    """Refuse an output that is the source, a folder above it, or one inside it: the last would change the
    source checkpoint's own folder (its listing, its push, a Hub cache's snapshot)."""
    source = source_dir.resolve()
    if source.is_relative_to(target):
        raise ConversionError(f"output directory {output_dir} would overwrite the source {source_dir}")
    if target.is_relative_to(source):
        raise ConversionError(
            f"output directory {output_dir} is inside the source {source_dir}: the conversion would change the "
            "source checkpoint's folder; choose a directory outside it"
        )


def _swap_into_place(staging: Path, output_dir: Path) -> None:
    """Rename ``staging`` to ``output_dir``; an existing ``output_dir`` is set aside first and restored if the
    rename fails, so at every moment one complete folder is there."""
    if not output_dir.exists():
        staging.rename(output_dir)
        return
    previous = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.previous.", dir=output_dir.parent))
    previous.rmdir()  # only its unique name is needed: renaming onto an existing folder is not portable
    output_dir.rename(previous)
    try:
        staging.rename(output_dir)
    except BaseException:
        previous.rename(output_dir)
        raise
    shutil.rmtree(previous)


def _resolve_source(source: str) -> tuple[Path, str | None]:
    """A local checkpoint directory, or a Hub model id downloaded (config, weights, tokenizer only)."""
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConversionError(f"source {source} is a file; give the checkpoint's directory")
        return path, None
    if source.startswith((".", "~")) or path.is_absolute():
        raise ConversionError(f"source directory {source} does not exist")
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(source)
    except HFValidationError:
        raise ConversionError(f"source {source!r} is neither an existing directory nor a Hub model id") from None
    return _download(source)


def _download(repo_id: str) -> tuple[Path, str]:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    common = [CONFIG_NAME, *PREPROCESSOR_PATTERNS]
    try:
        local = Path(snapshot_download(repo_id, allow_patterns=[*common, *_SAFETENSORS, "model-*.safetensors"]))
        if not (local / _SAFETENSORS[0]).is_file() and not (local / _SAFETENSORS[1]).is_file():
            local = Path(snapshot_download(repo_id, allow_patterns=[*common, *_TORCH_BIN, "pytorch_model-*.bin"]))
    except RepositoryNotFoundError:
        raise ConversionError(
            f"model {repo_id!r} was not found on the Hugging Face Hub (or is private: log in with `hf auth login`)"
        ) from None
    except LocalEntryNotFoundError:
        raise ConversionError(
            f"model {repo_id!r} is not a local directory and could not be downloaded from the Hub "
            "(no connection, or HF_HUB_OFFLINE=1, and it is not in the local cache)"
        ) from None
    except HfHubHTTPError as error:
        raise ConversionError(f"could not download {repo_id!r} from the Hub: {error}") from None
    # snapshot_download returns .../snapshots/<commit sha>.
    return local, local.name


def _read_config(source_dir: Path, source: str) -> tuple[dict, Any, ModelKind]:
    from transformers import AutoConfig

    if not (source_dir / CONFIG_NAME).is_file():
        raise ConversionError(f"{source} has no {CONFIG_NAME}: not a transformers checkpoint")
    try:
        config = AutoConfig.from_pretrained(source_dir)
    except (OSError, ValueError, KeyError) as error:
        raise ConversionError(f"{source}/{CONFIG_NAME} cannot be read by transformers: {error}") from None
    parts = [key for key in getattr(config, "sub_configs", None) or {} if getattr(config, key, None) is not None]
    if parts:  # (a sub-config left None is no part: ESM without ESMFold)
        raise UnsupportedModelError(
            f"{source} is a composite model (model_type={config.model_type!r}, parts: "
            f"{', '.join(parts)}); convert handles single-encoder checkpoints. Convert the vision "
            f"tower alone, or load the composite model with attn_implementation="
            '{"vision_config": "sinkhorn", "text_config": "sdpa"}.'
        )
    check_supported(config)
    return json.loads((source_dir / CONFIG_NAME).read_text()), config, model_kind(config)


def _weight_files(source_dir: Path, source: str) -> list[str]:
    """The files transformers would load weights from, shards included."""
    for single, index in (_SAFETENSORS, _TORCH_BIN):
        if (source_dir / index).is_file():
            try:
                shards = sorted(set(json.loads((source_dir / index).read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as error:
                raise ConversionError(f"{source}: {index} is not a readable weight index ({error!r})") from None
            missing = [shard for shard in shards if not (source_dir / shard).is_file()]
            if missing:
                raise ConversionError(f"{source}: {index} lists shards that are missing: {', '.join(missing)}")
            return [index, *shards]
        if (source_dir / single).is_file():
            return [single]
    raise ConversionError(
        f"{source} has no PyTorch weights (looked for {', '.join(_SAFETENSORS + _TORCH_BIN)}); "
        "TensorFlow/Flax-only checkpoints are not supported"
    )


def _copy_files(source_dir: Path, target_dir: Path, names: list[str]) -> None:
    total = sum((source_dir / name).stat().st_size for name in names)
    with tqdm(total=total, unit="B", unit_scale=True, desc="copying weights and tokenizer", leave=False) as bar:
        for name in names:
            shutil.copyfile(source_dir / name, target_dir / name)
            bar.update((source_dir / name).stat().st_size)


def _verify(directory: Path, settings: SinkhornSettings, auto_class: str) -> None:
    """Load the written config as users will, and build the model on the meta device (no memory, no weights)
    so transformers' attention checks run now rather than at the user's first load."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(directory)
    if config._attn_implementation != "sinkhorn" or SinkhornSettings.from_config(config) != settings:
        raise ConversionError(f"the written {CONFIG_NAME} does not reload with the Sinkhorn settings {settings}")
    model_class = getattr(transformers, auto_class)
    try:
        with torch.device("meta"):
            model_from_config(model_class, config)
    except ValueError as error:  # the load-time guards: decoder configs, attention outside the interface
        raise ConversionError(f"the converted model would not load with Sinkhorn attention: {error}") from None


def _check_weights(directory: Path, weights: list[str], source: str, output_dir: str | Path) -> None:
    """Read every tensor of every weight file in ``directory`` (one tensor in memory at a time for safetensors), so
    that a truncated or damaged file is refused, naming it, instead of replacing a good OUT."""
    import torch
    from safetensors import safe_open

    for name in weights:
        if name.endswith(".json"):
            continue  # the index, already read by _weight_files
        try:
            if name.endswith(".safetensors"):
                with safe_open(directory / name, framework="pt") as file:
                    for key in file.keys():  # noqa: SIM118  (safe_open is not a mapping)
                        file.get_tensor(key)
            else:
                torch.load(directory / name, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ConversionError(
                f"{source}: the weights file {name} cannot be read, it is truncated or damaged "
                f"({type(error).__name__}: {error}); {output_dir} was left as it was"
            ) from None
