"""Front ends that need the `experiments` extra say so in one line when it is missing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from l2l_peft.extras import MissingExtraError, require

# `python -m MODULE --help` with matplotlib made unimportable, as if the extra were not installed
WITHOUT_MATPLOTLIB = (
    "import runpy, sys; sys.modules['matplotlib'] = None; sys.argv[0] = {0!r}; "
    "runpy.run_module({0!r}, run_name='__main__', alter_sys=True)"
)


@pytest.mark.parametrize("module", ["l2l_peft.experiments", "l2l_peft.pretrain", "l2l_peft.demo"])
def test_missing_extra_is_one_line_naming_the_install(module):
    proc = subprocess.run(
        [sys.executable, "-c", WITHOUT_MATPLOTLIB.format(module), "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    line = f'error: python -m {module} needs the "experiments" extra (missing: matplotlib); '
    assert proc.stderr.strip().splitlines() == [line + 'install it with: pip install "l2l-peft[experiments]"']


def test_python_api_raises_an_import_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingExtraError, match=r'pip install "l2l-peft\[experiments\]"'):
        require("experiments", "l2l_peft.experiments")
    import l2l_peft.experiments

    with pytest.raises(ImportError, match="experiments"):
        l2l_peft.experiments.run_experiment  # noqa: B018
