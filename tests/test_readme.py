"""README's example runs as written (on the local MiniLM instead of the Hub id) and does what its comments say."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README.md has no python example"
    return blocks[0]


def test_readme_example_runs_and_is_sinkhorn(minilm_path, tmp_path):
    code = readme_example()
    hub_id = re.search(r'name = "([^"]+)"', code).group(1)
    code = code.replace(f'"{hub_id}"', repr(str(minilm_path))).replace('"out/bert-sinkhorn"', repr(str(tmp_path)))
    scope: dict = {}
    exec(compile(code, str(README), "exec"), scope)
    valid = scope["batch"]["attention_mask"].bool()
    for attention in scope["outputs"].attentions:
        rows = attention.sum(-1)[valid[:, None, :].expand(-1, attention.shape[1], -1)]
        torch.testing.assert_close(rows, torch.ones_like(rows))
        # the padded keys of the shorter sentence get no mass at all
        assert attention[0, :, :, ~valid[0]].abs().max() == 0
    saved = (tmp_path / "config.json").read_text()
    assert '"attn_implementation": "sinkhorn"' in saved and '"sinkhorn_iterations": 3' in saved


def test_readme_is_a_short_entry_point_whose_links_resolve():
    text = README.read_text()
    assert len(text.splitlines()) < 200, "README keeps what a newcomer needs first; the rest goes to docs/"
    links = re.findall(r"\]\(([^)#]+)\)", text)
    assert links, "README links into the documentation"
    missing = [link for link in links if "://" not in link and not (README.parent / link).exists()]
    assert missing == []
