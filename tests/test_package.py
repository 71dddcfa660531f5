"""Packaging promises: import without Triton or a compiler, kernels/ only as cl_optim.kernels."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import pytest

import cl_optim

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)


def test_import_works_without_triton_and_touches_no_cuda():
    code = (
        "import sys, builtins\n"
        "real_import = builtins.__import__\n"
        "def guarded(name, *a, **k):\n"
        "    if name.split('.')[0] in ('triton', 'ninja'):\n"
        "        raise ImportError('blocked for the test: ' + name)\n"
        "    return real_import(name, *a, **k)\n"
        "builtins.__import__ = guarded\n"
        "import torch\n"
        "torch.cuda.init = lambda: (_ for _ in ()).throw(AssertionError('CUDA touched at import'))\n"
        "import cl_optim, cl_optim.kernels\n"
        "assert 'triton' not in sys.modules\n"
        "print(cl_optim.__version__)\n"
    )
    result = _run(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == cl_optim.__version__


def test_kernels_is_installed_as_a_subpackage_only():
    """The source tree's kernels/ is importable as cl_optim.kernels only: a top-level ``kernels``,
    where one exists, is the PyPI package of that name (transformers 5.25 on installs it), never
    a file of this tree."""
    result = _run(
        "import cl_optim.kernels as k, importlib.util as u; s = u.find_spec('kernels'); "
        "print(k.__name__, k.__file__, s.origin if s else None)"
    )
    assert result.returncode == 0, result.stderr
    name, ours, top_level = result.stdout.split()
    assert name == "cl_optim.kernels" and pathlib.Path(ours).resolve().is_relative_to(ROOT / "kernels")
    assert top_level == "None" or not pathlib.Path(top_level).resolve().is_relative_to(ROOT / "kernels")


def test_the_tests_import_the_pypi_kernels_package_not_the_tree():
    """``python -m pytest`` from the root puts the tree first on sys.path; tests/conftest.py drops
    it, so a top-level ``import kernels`` (transformers' hub kernels) never finds kernels/."""
    import importlib.util

    spec = importlib.util.find_spec("kernels")
    assert spec is None or not pathlib.Path(spec.origin).resolve().is_relative_to(ROOT / "kernels")


def test_readme_commands_are_the_ones_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = re.search(r"<!-- test-command -->\n```bash\n(.*?)\n```", readme, re.S).group(1)
    for line in test_command.splitlines():
        assert line.strip() in ci, f"README test command line not in .ci/run: {line}"
    assert "python bench/continual.py" in readme


def test_public_api():
    assert set(cl_optim.__all__) >= {"SGD", "AdamW", "SAM", "report", "preserve_bn_stats", "skip_grad_sync"}


def test_a_failed_build_reports_the_compilers_error_lines():
    """ninja's last line ("build stopped: subcommand failed") says nothing; the reason a backend
    gives names the compiler's error."""
    from cl_optim._backend import _build_failure

    error = RuntimeError(
        "Error building extension 'cl_optim_cpu': [1/5] c++ -MMD -c sam.cpp -o sam.o\n"
        "FAILED: sam.o\n/src/op_checks.h:197:5: error: 'else' without a previous 'if'\n  197 |     else\n"
        "ninja: build stopped: subcommand failed.\n"
    )
    reason = _build_failure(error)
    assert "op_checks.h:197:5: error: 'else' without a previous 'if'" in reason
    assert "ninja: build stopped" not in reason


def test_the_first_build_is_announced(tmp_path, capsys, monkeypatch):
    from cl_optim._ext import _announce

    monkeypatch.delenv("CL_OPTIM_QUIET_BUILD", raising=False)
    _announce(tmp_path / "cl_optim_cpu.so", "the C++ CPU kernels", "about 30 s")
    assert "cl_optim: compiling the C++ CPU kernels" in capsys.readouterr().err
    (tmp_path / "cl_optim_cpu.so").write_bytes(b"")
    _announce(tmp_path / "cl_optim_cpu.so", "the C++ CPU kernels", "about 30 s")  # built: silent
    assert capsys.readouterr().err == ""


def test_every_subpackage_is_installed():
    """setup.py lists its packages by hand: a new subpackage missing there would be absent from a
    non-editable install (cl_optim.merge was, before this test)."""
    listed = set(re.findall(r'"(cl_optim(?:\.\w+)*)"', (ROOT / "setup.py").read_text()))
    found = {
        "cl_optim." + ".".join(d.relative_to(ROOT / "cl_optim").parts)
        for d in (ROOT / "cl_optim").rglob("*")
        if d.is_dir() and (d / "__init__.py").exists() and "__pycache__" not in d.parts
    }
    assert found <= listed, f"not in setup.py's packages: {sorted(found - listed)}"


def _modules_with_examples() -> list[str]:
    import doctest
    import importlib
    import pkgutil

    names = []
    for info in pkgutil.walk_packages(cl_optim.__path__, "cl_optim."):
        module = importlib.import_module(info.name)
        examples = [e for test in doctest.DocTestFinder().find(module) for e in test.examples]
        if any(not e.options.get(doctest.SKIP) for e in examples):  # (an example marked +SKIP is prose)
            names.append(info.name)
    return names


_EXAMPLES = _modules_with_examples()


def test_the_docstring_examples_are_found():
    """The core modules' examples are collected (a change in discovery must not silently test none)."""
    for name in ("cl_optim.sam", "cl_optim.adamw", "cl_optim.ewc", "cl_optim.ewc_ops", "cl_optim.sam_ops"):
        assert name in _EXAMPLES, name


@pytest.mark.parametrize("name", _EXAMPLES)
def test_every_docstring_example_runs(name):
    """Each docstring's runnable example gives what it shows (DESIGN.md: docstrings give the math
    and a runnable example)."""
    import doctest
    import importlib
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # e.g. float() of a tensor that requires grad
        failures, tried = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert tried > 0 and failures == 0, name
