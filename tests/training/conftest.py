"""Tiny models and small data written by the tests (no network, no /work/shared)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from tiny_models import save_tiny_bert

from sinkhorn_hf.compat import reset_accelerate_state

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "movie", "film", "is", "plot", "it", "was"]
POSITIVE = ["good", "great", "fine", "superb"]
NEGATIVE = ["bad", "awful", "dull", "boring"]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """Each trainer in a test process starts from a clean accelerate state, as a new process would."""
    yield
    reset_accelerate_state()


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A random 2-layer BERT encoder and a word-level WordPiece tokenizer saved like a Hub checkpoint."""
    from transformers import BertTokenizer

    words = VOCAB + POSITIVE + NEGATIVE
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"), tokenizer, max_position_embeddings=128)


def sentiment_rows(n: int, seed: int, max_words: int = 8) -> list[tuple[str, int]]:
    """Sentences whose label is the polarity of the one sentiment word they contain (learnable)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        label = rng.randint(0, 1)
        words = [rng.choice(VOCAB[5:]) for _ in range(rng.randint(1, max_words))]
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append((" ".join(words), label))
    return rows


@pytest.fixture
def sst2_files(tmp_path) -> tuple[Path, Path]:
    """GLUE SST-2 layout: sentence<TAB>label with a header; 96 train rows, 41 dev rows (odd on purpose)."""
    paths = []
    for name, n, seed in (("train.tsv", 96, 0), ("dev.tsv", 41, 1)):
        path = tmp_path / name
        path.write_text("sentence\tlabel\n" + "".join(f"{s} \t{y}\n" for s, y in sentiment_rows(n, seed)))
        paths.append(path)
    return paths[0], paths[1]


@pytest.fixture
def rte_files(tmp_path) -> tuple[str, str]:
    """GLUE RTE layout with string labels; sentence1's polarity word decides entailment (learnable)."""
    paths = []
    for name, n, seed in (("train.tsv", 64, 0), ("dev.tsv", 21, 1)):
        body = "".join(
            f"{i}\t{s}\tthe film was it\t{'entailment' if y == 0 else 'not_entailment'}\n"
            for i, (s, y) in enumerate(sentiment_rows(n, seed))
        )
        (tmp_path / name).write_text("index\tsentence1\tsentence2\tlabel\n" + body)
        paths.append(str(tmp_path / name))
    return paths[0], paths[1]


@pytest.fixture
def imdb_files(tmp_path) -> tuple[Path, Path]:
    """IMDB layout: gzip csv with text,label, sorted by label like the real files; reviews of 20-40 words with
    commas and quotes; the polarity words decide the label."""
    import csv
    import gzip

    paths = []
    for name, n, seed in (("train.csv.gz", 40, 0), ("test.csv.gz", 15, 1)):
        rng = random.Random(seed)
        rows = []
        for _ in range(n):
            label = rng.randint(0, 1)
            words = [rng.choice(VOCAB[5:]) for _ in range(rng.randint(20, 40))]
            for _ in range(3):
                words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
            rows.append((", ".join([" ".join(words[:5]), '"' + " ".join(words[5:]) + '"']), label))
        rows.sort(key=lambda r: r[1])
        path = tmp_path / name
        with gzip.open(path, "wt", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["text", "label"])
            writer.writerows(rows)
        paths.append(path)
    return paths[0], paths[1]
