"""Model cards for Sinkhorn checkpoints: ``RUN_DIR/README.md`` from the template in ``model_cards/``.

Reads what the run directory holds (config.json; results.json from the trainer; sinkhorn_conversion.json from
:func:`~sinkhorn_hf.hub.convert`) and renders it with huggingface_hub's ``ModelCard``/``ModelCardData``, so
the metadata block (base model, tags, datasets, ``model-index`` eval results) is the Hub's own format.

A card claims a Hub dataset's split in ``model-index`` only when the run evaluated all of it, from the Hub; a run
on local files or on a subset names those and the number of examples instead (:func:`evaluation_claim`). Whatever
a model's files or results hold is escaped (text, code, fences) or validated (class names are identifiers).
"""

from __future__ import annotations

import html
import importlib.resources
import json
import re
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .. import __version__
from ..adjoint import FORWARD_CHANGING_SCHEMES, SCALE_ATTRIBUTE
from ..attention.settings import SinkhornSettings
from ..families import UnsupportedModelError
from ..training.results import RESULTS_FILE, ResultsError, RunResults
from ..training.tasks.glue import GLUE_TASKS
from .convert import CONFIG_NAME, CONVERSION_RECORD
from .model_kind import model_kind

CARD_FILE = "README.md"
# ``model_cards/`` at the repository root, installed as the package ``sinkhorn_hf.model_cards`` (pyproject.toml).
TEMPLATE_PACKAGE, TEMPLATE_NAME = "sinkhorn_hf.model_cards", "sinkhorn_model_card.md"
# The card is often written before the repository exists; ``push`` fills this in with the repo id.
REPO_ID_PLACEHOLDER = "<namespace>/<model-name>"
SINKHORN_TAGS = ["sinkhorn", "sinkformer", "doubly-stochastic-attention"]

# Datasets the scripts know, by short name or Hub id: (the id the Hub lists them under, a readable name).
_DATASETS = {
    "glue": ("nyu-mll/glue", "GLUE"),
    "nyu-mll/glue": ("nyu-mll/glue", "GLUE"),
    "imdb": ("stanfordnlp/imdb", "IMDB"),
    "stanfordnlp/imdb": ("stanfordnlp/imdb", "IMDB"),
    "mnist": ("ylecun/mnist", "MNIST"),
    "ylecun/mnist": ("ylecun/mnist", "MNIST"),
}
# model-index metric ids (hf.co/metrics) where the key the metric returns differs.
_METRIC_IDS = {"pearson": "pearsonr"}
_METRIC_NAMES = {
    "accuracy": "Accuracy",
    "f1": "F1",
    "matthews_correlation": "Matthews correlation",
    "pearson": "Pearson correlation",
    "spearmanr": "Spearman correlation",
}


class CardError(ValueError):
    """The run directory or its results file cannot make a truthful card."""


def load_results(path: str | Path) -> RunResults:
    """Read and check a trainer ``results.json`` (:meth:`RunResults.read`); raises :class:`CardError` naming
    what is wrong."""
    try:
        return RunResults.read(path)
    except ResultsError as error:
        raise CardError(str(error)) from None


def build_card(
    run_dir: str | Path,
    results_path: str | Path | None = None,
    *,
    base_model: str | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    template_path: str | Path | None = None,
) -> ModelCard:
    """The card of the model saved in ``run_dir``.

    ``results_path`` defaults to ``run_dir/results.json`` when it exists (a fine-tuned run), else the card
    describes a converted, not fine-tuned checkpoint. ``base_model`` (a Hub id) overrides the one found in
    the results or the conversion record; ``repo_id`` goes into the "how to load" snippet.
    """
    run_dir = Path(run_dir)
    if repo_id is not None and not _is_hub_id(repo_id):
        raise CardError(f"--repo-id {repo_id!r} is not a Hub repository id (like 'user/model-name')")
    config = _load_config(run_dir)
    if results_path is None and (run_dir / RESULTS_FILE).is_file():
        results_path = run_dir / RESULTS_FILE
    results = load_results(results_path) if results_path is not None else None
    conversion = _read_record(run_dir)
    sinkhorn = config._attn_implementation == "sinkhorn"
    settings = SinkhornSettings.from_config(config) if sinkhorn else None
    if results is not None:
        _check_results_match_config(results, config, settings)
    try:
        kind = model_kind(config)
    except UnsupportedModelError as error:
        raise CardError(f"{run_dir}: {error}") from None
    title = repo_id.split("/")[-1] if repo_id else run_dir.resolve().name
    base_id, base_text = _base_model(base_model, results, conversion)
    claim = evaluation_claim(results) if results else None
    scores = _scores(results) if results else []
    task_type = kind.pipeline_tag or "text-classification"
    eval_results = [
        EvalResult(
            task_type=task_type,
            task_name=task_type.replace("-", " ").capitalize(),
            dataset_type=claim.dataset_type,
            dataset_name=claim.entry_name(split, count),
            dataset_config=claim.config if claim.kind == "canonical" else None,
            dataset_split=split if claim.kind == "canonical" else None,
            metric_type=_METRIC_IDS.get(metric, metric),
            metric_name=_METRIC_NAMES.get(metric, metric),
            metric_value=value,
        )
        for metric, split, value, count in scores
    ]
    card_data = ModelCardData(
        base_model=base_id,
        library_name="transformers",
        license=license,
        pipeline_tag=kind.pipeline_tag,
        tags=SINKHORN_TAGS if sinkhorn else None,
        datasets=[claim.hub_id] if claim and claim.hub_id else None,
        metrics=sorted({_METRIC_IDS.get(metric, metric) for metric, *_ in scores}) or None,
        model_name=title if eval_results else None,  # model-index names the model; nothing else uses it
        eval_results=eval_results or None,
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(template_path or default_template()),
        title=title,
        repo_id=repo_id or REPO_ID_PLACEHOLDER,
        base_text=base_text,
        base_is_hub=base_id is not None,
        # transformers does not save SoftMax choices (sdpa/eager) in config.json; the run's record has them.
        attention=config._attn_implementation or (results and results.attn_implementation) or "default (sdpa)",
        settings=settings,
        settings_rows=[(f"sinkhorn_{name}", value) for name, value in asdict(settings).items()] if settings else [],
        conversion=conversion,
        results=results,
        claim=claim,
        local_data=_local_data(results) if results else None,
        metric_rows=[
            (_METRIC_NAMES.get(metric, metric), split, "" if count is None else count, f"{value:.4f}")
            for metric, split, value, count in scores
        ],
        lora=_describe(results.lora) if results and results.lora else None,
        kind=kind,
        has_preprocessor=_has_preprocessor(run_dir, kind.is_text),
        version=__version__,
        text=markdown_text,
        code=markdown_code,
        fence=markdown_fence,
        **_adjoint_context(results, config),
    )


def markdown_text(value: Any) -> str:
    """``value`` as inert Markdown text, also inside a table cell: lines joined, ``& < > | ` `` as HTML entities
    (shown as themselves, never parsed as HTML, cell borders or code), a leading ``#`` escaped."""
    text = html.escape(" ".join(str(value).splitlines()), quote=False).replace("|", "&#124;").replace("`", "&#96;")
    return "\\" + text if text.startswith("#") else text


def markdown_code(value: Any) -> str:
    """``value`` as inline code: a plain code span when it needs no escaping, else an HTML ``<code>`` element
    around :func:`markdown_text` (a code span shows entities literally, and cannot hold a pipe in a table)."""
    text = str(value)
    if re.search(r"[`|<>&\r\n]", text) is None:
        return f"`{text}`"
    return f"<code>{markdown_text(text)}</code>"


def markdown_fence(value: Any, info: str = "") -> str:
    """``value`` verbatim in a fenced code block whose fence is longer than any backtick run inside it, so no line
    of ``value`` can close it (CommonMark); inside a fence nothing is parsed as Markdown or HTML."""
    text = "\n".join(str(value).splitlines())
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{info}\n{text}\n{fence}"


def _adjoint_context(results: RunResults | None, config: Any) -> dict[str, Any]:
    """How the card shows the adjoint, and what the loading snippet must switch on to get the trained function
    (``enable_adjoint`` applies forward-changing schemes, which transformers does not know; a stored residual
    scale is applied at load once ``sinkhorn_hf`` is imported)."""
    adjoint = results.adjoint if results else None
    scheme = adjoint.get("scheme") if isinstance(adjoint, dict) else adjoint
    residual_scale = getattr(config, SCALE_ATTRIBUTE, None)
    if residual_scale is not None and (
        isinstance(residual_scale, bool) or not isinstance(residual_scale, (int, float))
    ):
        raise CardError(f"config.json {SCALE_ATTRIBUTE} must be a number, got {residual_scale!r}")
    if residual_scale in (None, 1, 1.0):
        residual_scale = None
    return {
        "adjoint": _describe(adjoint) if adjoint not in (None, False, "off") else None,
        "residual_scale": residual_scale,
        "load_scheme": scheme if scheme in FORWARD_CHANGING_SCHEMES else None,
    }


def write_card(run_dir: str | Path, results_path: str | Path | None = None, **kwargs: Any) -> Path:
    """Render :func:`build_card` into ``run_dir/README.md`` (replacing any card there) and return its path."""
    path = Path(run_dir) / CARD_FILE
    build_card(run_dir, results_path, **kwargs).save(path)
    return path


def default_template() -> Path:
    """The built-in card template: in the installed package, or in ``model_cards/`` of a source checkout."""
    try:
        path = Path(str(importlib.resources.files(TEMPLATE_PACKAGE) / TEMPLATE_NAME))
    except ModuleNotFoundError:  # the source tree itself is on sys.path, where model_cards/ sits beside the package
        path = Path(__file__).resolve().parents[2] / "model_cards" / TEMPLATE_NAME
    if not path.is_file():
        raise CardError(
            f"card template {path} is missing (it ships with sinkhorn-hf): reinstall the package, "
            "or pass a template with --template (template_path=...)"
        )
    return path


def _load_config(run_dir: Path) -> Any:
    from transformers import AutoConfig

    if not (run_dir / CONFIG_NAME).is_file():
        if (run_dir / "adapter_config.json").is_file():
            raise CardError(
                f"{run_dir} holds a PEFT (LoRA) adapter without its model: merge it into its base model and save "
                "that there (model.merge_and_unload().save_pretrained(...)) so the card describes what loads"
            )
        raise CardError(f"{run_dir} has no {CONFIG_NAME}: save the model there with save_pretrained first")
    return AutoConfig.from_pretrained(run_dir)


def _read_record(directory: Path) -> dict[str, Any] | None:
    path = directory / CONVERSION_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def _check_results_match_config(results: RunResults, config: Any, settings: SinkhornSettings | None) -> None:
    """The card describes the saved model; results that disagree with it belong to another model."""
    trained_with = results.attn_implementation
    if trained_with is not None and (trained_with == "sinkhorn") != (settings is not None):
        raise CardError(
            f"results.json says the run used attn_implementation={trained_with!r} but the saved config.json "
            f"has {config._attn_implementation!r}: the results do not belong to this model"
        )
    iterations = results.sinkhorn_iterations
    if settings is not None and iterations is not None and iterations != settings.iterations:
        raise CardError(
            f"results.json says sinkhorn_iterations={iterations} but the saved config.json has "
            f"{settings.iterations}: the results do not belong to this model"
        )


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return not Path(name).expanduser().exists()


def _base_model(
    explicit: str | None, results: RunResults | None, conversion: dict | None
) -> tuple[str | None, str | None]:
    """(Hub id for the metadata or None, what the card text names). Follows local converted checkpoints back
    to what they were converted from."""
    if explicit is not None:
        if not _is_hub_id(explicit):
            raise CardError(f"--base-model {explicit!r} is not a Hub model id (like 'google-bert/bert-base-uncased')")
        return explicit, explicit
    candidate = results.model_name_or_path if results else conversion["source"] if conversion else None
    seen = set()
    while candidate is not None and candidate not in seen and Path(candidate).expanduser().is_dir():
        seen.add(candidate)
        record = _read_record(Path(candidate).expanduser())
        if record is None:
            break
        candidate = record["source"]
    if candidate is None:
        return None, None
    if _is_hub_id(candidate):
        return candidate, candidate
    warnings.warn(
        f"the base model is the local path {candidate}, which the Hub cannot link; pass its Hub id with "
        "--base-model (base_model=...) to fill the card's base_model field",
        stacklevel=3,
    )
    return None, candidate


@dataclass(frozen=True)
class EvaluationClaim:
    """What a card may say the run was evaluated on. ``kind``:

    - ``canonical``: the whole split(s) of the Hub dataset ``hub_id`` (configuration ``config``): ``model-index``
      names the dataset and the split;
    - ``subset``: part of a split (``--max_eval_samples``, a held-out part of train, or a results.json that does
      not say), or ``local``: local files. ``model-index`` then names no Hub dataset or split; each entry's name
      says what was evaluated and on how many examples.

    ``hub_id`` is the Hub dataset the data came from (the metadata's ``datasets``), None for local files; ``name``
    the readable name of the data."""

    name: str
    hub_id: str | None
    config: str | None
    kind: str
    partial: bool = False  # local files of which a seeded subset was evaluated

    @property
    def dataset_type(self) -> str:
        """model-index ``dataset.type``: the Hub id of a canonical split, else a word no Hub dataset links to."""
        return self.hub_id if self.kind == "canonical" else f"{self.kind}-evaluation"

    def entry_name(self, split: str | None, count: int | None) -> str:
        """model-index ``dataset.name``: the data, and for a non-canonical evaluation the split and the count."""
        if self.kind == "canonical":
            return self.name
        examples = f": {count} examples" if count is not None else ""
        if self.kind == "subset" or self.partial:
            return f"a subset of {self.name} {split or ''}".rstrip() + examples
        return f"{self.name}{examples}"


def evaluation_claim(results: RunResults) -> EvaluationClaim:
    """:class:`EvaluationClaim` of ``results``. ``dataset`` is a Hub id, optionally with its configuration
    (``nyu-mll/glue/sst2``), or local file(s); a split is canonical only when it is a plain split name, the data
    came from the Hub and ``eval_subset`` is recorded False."""
    task, dataset = results.task_name, results.dataset
    local = _local_data(results) is not None
    hub_id = config = None
    if task in GLUE_TASKS:
        hub_id, config, name = _DATASETS["glue"][0], task, f"GLUE {GLUE_TASKS[task].title}"
    else:
        hub_name = dataset if isinstance(dataset, str) and not local else None
        known = next((n.lower() for n in (hub_name, task) if n is not None and n.lower() in _DATASETS), None)
        if known is not None:
            hub_id, name = _DATASETS[known]
        elif hub_name is not None and _is_hub_id("/".join(hub_name.split("/")[:2])):
            parts = hub_name.split("/")
            hub_id, config, name = "/".join(parts[:2]), parts[2] if len(parts) == 3 else None, hub_name
        else:
            name = task or "unknown"
    if local:
        return EvaluationClaim(f"{name} (local files)", None, None, "local", partial=results.eval_subset is True)
    splits = [results.eval_split] if isinstance(results.eval_split, str) else results.eval_split or []
    plain = bool(splits) and all(re.fullmatch(r"[A-Za-z0-9_.-]+", split) for split in splits)
    whole = hub_id is not None and plain and results.eval_subset is False
    return EvaluationClaim(name, hub_id, config, "canonical" if whole else "subset")


def _local_data(results: RunResults) -> str | None:
    """The run's local data files, as the card shows them; None for Hub data."""
    dataset = results.dataset
    if isinstance(dataset, list):  # the trainer lists files; a Hub dataset is one name
        return ", ".join(dataset) or None
    if dataset is not None and (dataset.startswith(("/", ".", "~")) or Path(dataset).expanduser().exists()):
        return dataset
    return None


def _scores(results: RunResults) -> list[tuple[str, str | None, float, int | None]]:
    """(metric, evaluation split, value, examples evaluated) for each metric of ``results``.

    With several splits (MNLI matched/mismatched) the trainer names the first split's metrics plainly and
    appends a suffix per further split (``accuracy``, ``accuracy_mm``; ``num_samples``, ``num_samples_mm``);
    suffixes map to splits in order."""
    metrics, splits = results.metrics, results.eval_split
    splits = [splits] if splits is None or isinstance(splits, str) else splits

    def count(suffix: str) -> int | None:
        return results.num_eval_samples.get(f"num_samples{suffix}")

    if len(splits) <= 1:
        return [(metric, splits[0] if splits else None, value, count("")) for metric, value in metrics.items()]
    parsed = []
    for key, value in metrics.items():
        base = next((b for b in metrics if key != b and key.startswith(b + "_")), key)
        parsed.append((base, key[len(base) :], value))
    suffixes = list(dict.fromkeys(suffix for _, suffix, _ in sorted(parsed, key=lambda item: item[1] != "")))
    if len(suffixes) != len(splits):
        raise CardError(
            f"results.json has {len(splits)} evaluation splits ({', '.join(splits)}) but its metric names "
            f"({', '.join(metrics)}) do not split into as many groups (a plain name per metric, then one suffix "
            "per further split)"
        )
    return [(base, splits[suffixes.index(suffix)], value, count(suffix)) for base, suffix, value in parsed]


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{key}={item}" for key, item in value.items())
    return str(value)


def _has_preprocessor(run_dir: Path, is_text: bool) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json") if is_text else ("preprocessor_config.json",)
    return any((run_dir / name).is_file() for name in names)
