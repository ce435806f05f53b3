"""setup.py's search for the CUDA toolkit (find_cuda_home), on fake toolkits in tmp_path.

torch.utils.cpp_extension takes the parent of the folder of the nvcc on PATH as the
toolkit, which is wrong for a wrapper script or a symlink outside it; setup.py follows
nvcc to its toolkit instead, or says to set CUDA_HOME.
"""
import os
import runpy
import sys

import pytest
import setuptools

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="shell-script fake nvcc")


@pytest.fixture
def setup_py(monkeypatch):
    """setup.py's namespace, loaded with setuptools.setup stubbed out (nothing is built)."""
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)
    monkeypatch.setenv("CNNEXT_CPU_ONLY", "1")  # no toolkit search while loading
    ns = runpy.run_path(os.path.join(ROOT, "setup.py"), run_name="setup_under_test")
    monkeypatch.delenv("CNNEXT_CPU_ONLY")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    return ns


def script(path, body):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


@pytest.fixture
def toolkit(tmp_path):
    """A fake toolkit whose nvcc, like the real one, prints `#$ TOP=<its bin>/..` on --dryrun."""
    tk = tmp_path / "cuda-13.0"
    (tk / "include").mkdir(parents=True)
    (tk / "include" / "cuda_runtime.h").write_text("")
    script(tk / "bin" / "nvcc", f'for a in "$@"; do [ "$a" = --dryrun ] && echo "#$ TOP={tk}/bin/.." >&2; done\nexit 0\n')
    return tk


def test_wrapper_script_outside_the_toolkit(setup_py, toolkit, tmp_path, monkeypatch):
    wrapper = script(tmp_path / "wrappers" / "bin" / "nvcc", f'exec {toolkit}/bin/nvcc "$@"\n')
    monkeypatch.setenv("PATH", f"{wrapper.parent}{os.pathsep}/usr/bin{os.pathsep}/bin")
    assert setup_py["find_cuda_home"]() == (str(toolkit), None)


def test_symlink_outside_the_toolkit(setup_py, toolkit, tmp_path, monkeypatch):
    link = tmp_path / "links" / "bin" / "nvcc"
    link.parent.mkdir(parents=True)
    link.symlink_to(toolkit / "bin" / "nvcc")
    monkeypatch.setenv("PATH", f"{link.parent}{os.pathsep}/usr/bin{os.pathsep}/bin")
    assert setup_py["find_cuda_home"]() == (str(toolkit), None)


def test_cuda_home_wins_and_must_be_a_toolkit(setup_py, toolkit, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"/usr/bin{os.pathsep}/bin")
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    assert setup_py["find_cuda_home"]() == (str(toolkit), None)
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    home, why = setup_py["find_cuda_home"]()
    assert home is None
    assert f"CUDA_HOME={tmp_path}" in why and "cuda_runtime.h" in why


def test_nvcc_that_names_no_toolkit(setup_py, tmp_path, monkeypatch):
    silent = script(tmp_path / "odd" / "bin" / "nvcc", "exit 1\n")
    monkeypatch.setenv("PATH", f"{silent.parent}{os.pathsep}/usr/bin{os.pathsep}/bin")
    home, why = setup_py["find_cuda_home"]()
    assert home is None
    assert str(silent) in why


def test_failure_message_says_to_set_cuda_home(setup_py, monkeypatch):
    assert "set CUDA_HOME" in setup_py["NO_TOOLKIT"]
