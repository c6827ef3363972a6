"""README's Python snippet runs as written, on a converted folder and on every released layout."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from minimax_m3_mlx import synthetic
from minimax_m3_mlx.convert import convert

README = Path(__file__).resolve().parents[1] / "README.md"
NAME = "MiniMax-M3-mac-256gb"  # the folder name the snippet uses


def python_snippet() -> str:
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    (block,) = [b for b in blocks if "load_model" in b]
    return block


@pytest.fixture(scope="module")
def sources(default_case, tmp_path_factory):
    """Each layout as released (the vision tower included), and a quantised conversion."""
    root = tmp_path_factory.mktemp("readme")
    for layout in synthetic.LAYOUTS:
        default_case.write(root / layout, layout, fp8_block=(24, 40))
    convert(str(root / "original"), str(root / "converted"), quantize=True, q_bits=4, q_group_size=32,
            progress=False, log=lambda *a: None)
    return root


@pytest.mark.parametrize("kind", ["converted", *synthetic.LAYOUTS])
def test_readme_python_snippet_as_written(kind, sources, tmp_path, monkeypatch, capsys):
    snippet = python_snippet()
    assert f'"{NAME}"' in snippet and "load_model(" in snippet
    shutil.copytree(sources / kind, tmp_path / NAME)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(snippet, "README.md", "exec"), scope)
    model, config = scope["model"], scope["config"]
    assert type(model).__module__.startswith("minimax_m3_mlx.model")
    assert isinstance(config, dict) and "text_config" in config
    assert capsys.readouterr().out  # the streamed text
