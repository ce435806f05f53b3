"""Every ```python block of README.md runs as written, each on its own (a fresh namespace)."""
import os
import re

import pytest

from conftest import import_torchvision

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def python_blocks():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_readme_has_python_blocks():
    blocks = python_blocks()
    assert len(blocks) >= 4
    assert any("cnnext.convert(" in b and "cnnext.enable()" in b and "cnnext.fuse(" in b and "torchvision" in b
               for b in blocks)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_block_runs(index, capsys, tmp_path, monkeypatch):
    # In a temporary folder: blocks that write files (the training run's runs/...) leave
    # nothing in the checkout.
    monkeypatch.chdir(tmp_path)
    code = python_blocks()[index]
    if "torchvision" in code:
        # The block imports torchvision as a user would; the harness imports it first
        # through conftest's import_torchvision, which applies the one shim this machine's
        # CUDA-built torchvision wheel needs against a CPU torch (and skips without it).
        import_torchvision()
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})
