"""sinkhorn_hf.atomic_files: the content arrives whole, a failing write leaves the old file and no temporary one."""

import json

import pytest

from sinkhorn_hf.atomic_files import save_figure_atomic, write_atomic, write_json_atomic, write_text_atomic


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_text_and_json_are_written_whole(tmp_path):
    text_path = write_text_atomic(tmp_path / "notes.md", "θ = 1\n")
    assert text_path == tmp_path / "notes.md"
    assert text_path.read_bytes() == "θ = 1\n".encode()
    data = {"runs": [{"seed": 0, "accuracy": 97.5}], "name": "σ"}
    json_path = write_json_atomic(str(tmp_path / "results.json"), data, indent=1)
    assert json_path.read_text(encoding="utf-8") == json.dumps(data, indent=1) + "\n"
    assert json.loads(json_path.read_text()) == data
    assert names(tmp_path) == ["notes.md", "results.json"]  # no temporary sibling left


def test_replaces_an_existing_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("old")
    write_atomic(path, lambda file: file.write(b"new"))
    assert path.read_bytes() == b"new" and names(tmp_path) == ["results.json"]


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failing_writer_leaves_the_old_file_and_no_temporary(tmp_path, error):
    path = tmp_path / "results.json"
    path.write_text("old")
    seen = []

    def write_half_then_fail(file):
        file.write(b"half of the new ")
        file.flush()
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        raise error

    with pytest.raises(type(error)):
        write_atomic(path, write_half_then_fail)
    assert path.read_text() == "old"
    assert names(tmp_path) == ["results.json"]
    # the half-written data went to a hidden sibling named after the target, never to the target itself
    (temporary,) = set(seen[0]) - {"results.json"}
    assert temporary.startswith(".results.json.") and temporary.endswith(".tmp")


def test_unserialisable_json_leaves_nothing(tmp_path):
    with pytest.raises(TypeError, match="not JSON serializable"):
        write_json_atomic(tmp_path / "results.json", {"bad": object()})
    assert names(tmp_path) == []


def test_a_failing_write_of_a_new_file_leaves_nothing(tmp_path):
    def write_then_fail(file):
        file.write(b"{")
        raise OSError("no space left on device")

    with pytest.raises(OSError, match="no space"):
        write_atomic(tmp_path / "results.json", write_then_fail)
    assert names(tmp_path) == []


def test_text_must_be_a_str(tmp_path):
    with pytest.raises(TypeError, match="must be a str, got NoneType"):
        write_text_atomic(tmp_path / "notes.md", None)
    assert names(tmp_path) == []


def test_missing_folder_is_a_clear_error(tmp_path):
    target = tmp_path / "no_such_folder" / "results.json"
    with pytest.raises(FileNotFoundError, match=r"cannot write .*results\.json: its folder .*no_such_folder does not"):
        write_text_atomic(target, "x")
    assert names(tmp_path) == []


def test_a_folder_in_the_way_is_refused_and_left_alone(tmp_path):
    (tmp_path / "results.json").mkdir()
    (tmp_path / "results.json" / "keep").write_text("not ours")
    with pytest.raises(OSError):
        write_text_atomic(tmp_path / "results.json", "x")
    assert names(tmp_path) == ["results.json"] and (tmp_path / "results.json" / "keep").read_text() == "not ours"


def test_figure_saves_in_the_target_format_and_pyplot_lets_it_go(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    figure, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save_figure_atomic(figure, tmp_path / "plot.png", dpi=50)
    assert path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert not plt.fignum_exists(figure.number)  # closed: pyplot holds no reference any more
    standalone = Figure()
    standalone.subplots().plot([0, 1])
    save_figure_atomic(standalone, tmp_path / "plot.svg")
    assert b"<svg" in (tmp_path / "plot.svg").read_bytes()[:500]
    save_figure_atomic(standalone, tmp_path / "named.bin", format="png")  # format= wins over the suffix
    assert (tmp_path / "named.bin").read_bytes().startswith(b"\x89PNG")
    assert names(tmp_path) == ["named.bin", "plot.png", "plot.svg"]


def test_a_failing_savefig_leaves_the_old_figure(tmp_path):
    from matplotlib.figure import Figure

    path = tmp_path / "plot.png"
    path.write_bytes(b"old png")
    with pytest.raises(ValueError, match="not supported"):
        save_figure_atomic(Figure(), path, format="no-such-format")
    assert path.read_bytes() == b"old png" and names(tmp_path) == ["plot.png"]
