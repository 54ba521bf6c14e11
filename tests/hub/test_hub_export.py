"""``sinkhorn-hf export``: refusals up front, and (slow) a checked ONNX file written in one step."""

import json

import numpy as np
import pytest
import torch
import transformers
from hub_helpers import save_tiny_bert
from tiny_models import make_tiny

import sinkhorn_hf  # noqa: F401
from sinkhorn_hf.cli import main as cli_main
from sinkhorn_hf.compat import config_attn_implementation
from sinkhorn_hf.hub.export import ExportError, export_onnx


def main(argv: list[str]) -> int:
    """The export subcommand as the console script runs it."""
    return cli_main(argv)


@pytest.fixture
def saved_sinkhorn(tmp_path):
    tiny = make_tiny("bert", "sinkhorn")
    tiny.model.config.sinkhorn_iterations = 3
    tiny.model.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_existing_file_is_not_replaced_without_overwrite(saved_sinkhorn, tmp_path):
    target = tmp_path / "model.onnx"
    target.write_text("keep me")
    with pytest.raises(ExportError, match="exists; pass --overwrite"):
        export_onnx(saved_sinkhorn, target)
    assert target.read_text() == "keep me"


@pytest.mark.parametrize(
    "name, message", [("model.txt", "must be a .onnx file"), ("missing/model.onnx", "does not exist")]
)
def test_bad_output_paths_are_refused(saved_sinkhorn, tmp_path, name, message):
    with pytest.raises(ExportError, match=message):
        export_onnx(saved_sinkhorn, tmp_path / name)


def test_folder_without_config_is_refused(tmp_path):
    with pytest.raises(ExportError, match="cannot read a transformers config"):
        export_onnx(tmp_path, tmp_path / "model.onnx")


@pytest.mark.slow
def test_export_command_writes_a_checked_file(saved_sinkhorn, tmp_path, capsys):
    target = tmp_path / "model.onnx"
    assert main(["export", str(saved_sinkhorn), str(target)]) == 0
    printed = capsys.readouterr().out
    assert "iterations=3" in printed and "max abs difference" in printed
    assert sorted(path.name for path in tmp_path.iterdir()) == ["model", "model.onnx"], "no scratch left behind"
    import onnxruntime

    session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
    model = transformers.AutoModel.from_pretrained(saved_sinkhorn).eval()
    ids = torch.randint(3, 99, (3, 11))
    mask = (torch.arange(11)[None] < torch.tensor([11, 5, 8])[:, None]).long()
    feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
    with torch.no_grad():
        expected = model(**feed).last_hidden_state.numpy()
    got = session.run(["last_hidden_state"], {name: tensor.numpy() for name, tensor in feed.items()})[0]
    assert np.abs(got - expected).max() < 1e-4
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        main(["export", str(saved_sinkhorn), str(target)])
    assert main(["export", str(saved_sinkhorn), str(target), "--overwrite"]) == 0
    assert json.loads((saved_sinkhorn / "config.json").read_text())["attn_implementation"] == "sinkhorn"


def test_sentence_transformers_round_trip(tmp_path):
    """sentence-transformers passes config= to from_pretrained: sinkhorn_* settings in model_kwargs must still land."""
    st = pytest.importorskip("sentence_transformers")
    models = pytest.importorskip("sentence_transformers.models")
    source = save_tiny_bert(tmp_path / "bert")
    kwargs = {"attn_implementation": "sinkhorn", "sinkhorn_iterations": 5}
    word = models.Transformer(str(source), model_kwargs=kwargs)
    model = st.SentenceTransformer(modules=[word, models.Pooling(word.get_embedding_dimension())])
    bert = word.auto_model
    assert config_attn_implementation(bert.config) == "sinkhorn" and bert.config.sinkhorn_iterations == 5
    sentences = ["a b c d", "e f", "a c e g h"]
    before = model.encode(sentences, convert_to_tensor=True)
    features = model.tokenize(sentences)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for _ in range(3):  # fine-tune a few steps: pull the first two embeddings together
        embeddings = model(dict(features))["sentence_embedding"]
        loss = 1 - torch.nn.functional.cosine_similarity(embeddings[0], embeddings[1], dim=0)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    after = model.encode(sentences, convert_to_tensor=True)
    assert not torch.allclose(before, after, atol=1e-4)
    model.save(str(tmp_path / "st"))
    reloaded = st.SentenceTransformer(str(tmp_path / "st"))
    assert config_attn_implementation(reloaded[0].auto_model.config) == "sinkhorn"
    assert reloaded[0].auto_model.config.sinkhorn_iterations == 5
    torch.testing.assert_close(reloaded.encode(sentences, convert_to_tensor=True), after, atol=1e-5, rtol=0)
