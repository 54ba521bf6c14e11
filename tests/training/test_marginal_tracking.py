"""The attention-marginal tracker and its TrainerCallback: numbers equal ``diagnose``'s (softmax_marginals /
marginal_report) on the same batch and a brute-force float64 reference; the callback works in a real Trainer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny_models import make_tiny, sharpen, tiny_config
from transformers import BertForSequenceClassification, Trainer, TrainingArguments

import sinkhorn_hf  # noqa: F401  (registers attn_implementation="sinkhorn")
from sinkhorn_hf.attention.diagnostics import softmax_marginals
from sinkhorn_hf.compat import config_attn_implementation, model_from_config
from sinkhorn_hf.training.callbacks import AttentionMarginalsCallback
from sinkhorn_hf.training.marginals import QUANTILES, MarginalTracker, flat_metrics, sorted_column_sums


def _brute_force_column_stats(model, inputs, valid):
    """Per layer: mean over (example, head) of std and max |c_j - 1| of column sums over valid tokens, by loops."""
    with torch.no_grad():
        model.set_attn_implementation("eager")
        attentions = model(**inputs, output_attentions=True).attentions
    out = []
    for attention in attentions:
        attention = attention.double()
        stds, errors = [], []
        for b in range(attention.shape[0]):
            n = int(valid[b].sum())
            for h in range(attention.shape[1]):
                sums = attention[b, h, :n, :n].sum(0)
                stds.append(float(((sums - 1) ** 2).mean().sqrt()))
                errors.append(float((sums - 1).abs().max()))
        out.append((sum(stds) / len(stds), sum(errors) / len(errors)))
    return out


def test_tracker_equals_diagnose_and_brute_force_on_a_padded_batch():
    tiny = sharpen(make_tiny("bert", layers=3))  # peaked attention: column sums far from 1
    tracker = MarginalTracker(tiny.model, tiny.inputs, every=1)
    record = tracker.track(step=7)
    report = softmax_marginals(tiny.model, **tiny.inputs).summary()
    reference = _brute_force_column_stats(tiny.model, tiny.inputs, tiny.valid)
    assert record["step"] == 7 and len(record["layers"]) == 3
    for layer, row, (std, error) in zip(record["layers"], report, reference, strict=True):
        assert layer["softmax_column_std"] == row["column_std"]
        assert layer["softmax_column_error"] == row["column_error"]
        assert layer["softmax_column_std"] == pytest.approx(std, rel=1e-5)
        assert layer["softmax_column_error"] == pytest.approx(error, rel=1e-5)
        assert layer["softmax_column_std"] > 0.05  # sharpened: not doubly stochastic
        assert "sinkhorn_column_error" not in layer
    # the picture's curve: quantiles of the column sums at the valid columns only (3 examples × 2 heads)
    quantiles = record["column_sum_quantiles"]
    assert len(quantiles) == 3 and all(len(q) == QUANTILES for q in quantiles)
    assert all(a <= b for q in quantiles for a, b in zip(q[:-1], q[1:], strict=True))
    assert config_attn_implementation(tiny.model.config) == "eager" and not tiny.model.training


def test_sorted_column_sums_keep_only_valid_columns_and_average_one():
    attention = torch.softmax(torch.randn(2, 3, 5, 5, dtype=torch.float64), -1)
    valid = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]], dtype=torch.bool)
    attention[1, :, :, 3:] = 0  # padded keys get no weight, as a masked SoftMax gives
    attention[1] /= attention[1].sum(-1, keepdim=True)
    sums = sorted_column_sums(attention, valid)
    assert sums.shape == (3 * 5 + 3 * 3,)
    # rows (over valid keys) sum to 1 ⇒ the valid columns' sums average to 1 per (example, head)
    assert float(sums.sum()) == pytest.approx(3 * 5 + 3 * 3)
    expected = torch.cat([attention[0].sum(-2).flatten(), attention[1, :, :3, :3].sum(-2).flatten()]).sort().values
    torch.testing.assert_close(sums, expected)


def test_sinkhorn_model_reports_its_own_column_error_and_softmax_spread():
    tiny = sharpen(make_tiny("bert", attn_implementation="sinkhorn", layers=2, sinkhorn_iterations=9))
    record = MarginalTracker(tiny.model, tiny.inputs, every=1).track(0)
    assert config_attn_implementation(tiny.model.config) == "sinkhorn"  # restored after the eager SoftMax pass
    tiny.model.set_attn_implementation("eager")
    softmax = softmax_marginals(tiny.model, **tiny.inputs).summary()
    for layer, row in zip(record["layers"], softmax, strict=True):
        assert layer["softmax_column_std"] == row["column_std"]
        # 9 Sinkhorn iterations bring the columns far closer to 1 than SoftMax
        assert layer["sinkhorn_column_error"] < 0.1 * layer["softmax_column_error"]


def test_maybe_track_every_n_steps_and_bad_input():
    tiny = make_tiny("bert")
    tracker = MarginalTracker(tiny.model, tiny.inputs, every=3)
    tracked = [step for step in range(8) if tracker.maybe_track(step) is not None]
    assert tracked == [0, 3, 6] and [r["step"] for r in tracker.records] == [0, 3, 6]
    assert tracker.maybe_track(6) is None  # once per step
    with pytest.raises(ValueError, match="every must be an integer ≥ 1"):
        MarginalTracker(tiny.model, tiny.inputs, every=0)
    with pytest.raises(ValueError, match="forward arguments"):
        MarginalTracker(tiny.model, {}, every=1)


def test_write_json_and_png(tmp_path):
    tiny = sharpen(make_tiny("bert", layers=4))
    tracker = MarginalTracker(tiny.model, tiny.inputs, every=1, title="tiny")
    tracker.track(0)
    with torch.no_grad():
        for layer in tiny.model.encoder.layer:
            layer.attention.self.query.weight.mul_(0.1)  # flatter attention: closer to doubly stochastic
    tracker.track(5)
    paths = tracker.write(tmp_path)
    saved = json.loads(paths["json"].read_text())
    assert saved["records"] == tracker.records and saved["quantiles"] == QUANTILES
    assert paths["png"].stat().st_size > 10_000
    assert not list(tmp_path.glob("*.tmp*"))
    first, last = (r["layers"][0]["softmax_column_std"] for r in tracker.records)
    assert last < first


def test_callback_inside_transformers_trainer(tmp_path):
    torch.manual_seed(0)
    config = tiny_config("bert", layers=2, num_labels=2)
    model = model_from_config(BertForSequenceClassification, config, attn_implementation="sdpa")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 99, (16, 9), generator=generator)
    mask = (torch.arange(9)[None] < torch.randint(4, 10, (16, 1), generator=generator)).long()
    dataset = [
        {"input_ids": ids[i] * mask[i], "attention_mask": mask[i], "labels": int(ids[i, 0] % 2)} for i in range(16)
    ]
    eval_batch = {"input_ids": ids[:5] * mask[:5], "attention_mask": mask[:5]}
    callback = AttentionMarginalsCallback(eval_batch, every_n_steps=2, output_dir=tmp_path / "marginals")
    args = TrainingArguments(
        output_dir=str(tmp_path / "trainer"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
    )
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[callback])
    trainer.train()
    steps = [record["step"] for record in callback.tracker.records]
    assert steps == [0, 2, 4]
    logged = [entry for entry in trainer.state.log_history if "attention_marginals/layer_0/softmax_column_std" in entry]
    assert [entry["step"] for entry in logged] == [0, 2, 4]
    assert logged[-1] == {**flat_metrics(callback.tracker.records[-1]), "step": 4}
    # the last record is the tracker run directly on the final model, and the trainer left it as it was
    assert config_attn_implementation(model.config) == "sdpa"
    direct = MarginalTracker(model, eval_batch, every=1).track(4)
    assert direct == callback.tracker.records[-1]
    assert callback.tracker.records[0] != callback.tracker.records[-1]  # training moved the attention
    saved = json.loads((tmp_path / "marginals" / "attention_marginals.json").read_text())
    assert [record["step"] for record in saved["records"]] == [0, 2, 4]
    assert (tmp_path / "marginals" / "attention_marginals.png").stat().st_size > 10_000


def test_trainer_flag_tracks_every_n_steps_into_results(tiny_bert, sst2_files, tmp_path):
    """--track_attention_marginals N: records at step 0 and every N optimizer steps in results.json, a picture,
    and the last record equals the tracker run afresh on the final model with the same evaluation batch."""
    from test_trainer import make_trainer

    trainer = make_trainer(
        tiny_bert, sst2_files, tmp_path / "run", num_train_epochs=1, track_attention_marginals=4, attn="sdpa"
    )
    results = trainer.train()
    tracked = results.attention_marginals
    steps = [record["step"] for record in tracked["records"]]
    assert steps == list(range(0, results.train_steps + 1, 4))
    assert Path(tracked["png"]).is_file() and Path(tracked["json"]).is_file()
    saved = json.loads((tmp_path / "run" / "results.json").read_text())["attention_marginals"]
    assert saved["records"] == tracked["records"]
    assert steps[-1] == results.train_steps  # 96 rows, batch 8: 12 steps
    again = MarginalTracker(trainer.marginals.model, trainer.marginals.batch, 1).track(steps[-1])
    assert again["layers"] == tracked["records"][-1]["layers"]
