"""The installed project: its import names collide with no dependency's, and its entry scripts
import the installed package (no sys.path tricks), from any working directory.

History: the kernel package used to be called ``kernels``, the import name of Hugging Face's
``kernels`` distribution, which transformers 5.25 requires and imports: whichever came first on
sys.path won, and either transformers or our loss broke.
"""
import importlib.metadata
import subprocess
import sys

import pytest

from conftest import REPO

DIST = "coma-pipeline"
ENTRY_SCRIPTS = sorted(p.relative_to(REPO).as_posix() for d in ("launch", "data_prep", "benchmarks")
                       for p in (REPO / d).glob("*.py") if p.name != "__init__.py"
                       and "find_spec(\"pipeline\")" in p.read_text())


def our_import_names() -> list[str]:
    names = (importlib.metadata.distribution(DIST).read_text("top_level.txt") or "").split()
    assert names, f"{DIST} is installed without top_level.txt: reinstall with `pip install -e .`"
    return names


def test_no_dependency_installs_one_of_our_import_names():
    owners = importlib.metadata.packages_distributions()
    ours = importlib.metadata.distribution(DIST).metadata["Name"]
    clashes = {name: sorted(set(owners.get(name, [])) - {ours}) for name in our_import_names()}
    assert not any(clashes.values()), f"import names that another installed distribution also provides: {clashes}"
    assert set(our_import_names()) == {"pipeline", "coma_kernels", "data_prep"}


@pytest.mark.smoke
@pytest.mark.parametrize("cwd", ["repo", "elsewhere"])
def test_transformers_hub_kernels_and_ours_import_side_by_side(cwd, tmp_path):
    """From the repository root (where `python -c` puts the cwd first on sys.path: the worst
    case) and from an unrelated folder, transformers' hub-kernel integration (which imports
    Hugging Face's `kernels` when installed) and our `coma_kernels` both import."""
    code = ("import importlib.util, sys, transformers.integrations.hub_kernels, coma_kernels\n"
            "assert callable(coma_kernels.fused_infonce) and callable(coma_kernels.gathered_infonce)\n"
            "spec = importlib.util.find_spec('kernels')  # Hugging Face's, never a folder of this checkout\n"
            "assert spec is None or not spec.origin.startswith(sys.argv[1] + '/kernels/'), spec.origin\n"
            "print('ok', spec is not None)\n")
    r = subprocess.run([sys.executable, "-c", code, str(REPO)], cwd=REPO if cwd == "repo" else tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split()[0] == "ok"


def test_entry_scripts_use_no_sys_path_tricks():
    assert len(ENTRY_SCRIPTS) >= 15, ENTRY_SCRIPTS
    offenders = [f for f in ENTRY_SCRIPTS if "sys.path" in (REPO / f).read_text()]
    assert not offenders, f"entry scripts that edit sys.path (import the installed package instead): {offenders}"


@pytest.mark.parametrize("script", ENTRY_SCRIPTS)
def test_entry_script_without_the_package_says_how_to_install(script, tmp_path):
    """`python -S` skips site-packages, which is what running with a Python where the project was
    never installed looks like: one line naming the fix, no traceback."""
    r = subprocess.run([sys.executable, "-S", str(REPO / script), "--help"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert r.stderr.count("\n") == 1 and "pip install -e ." in r.stderr, r.stderr


@pytest.mark.parametrize("script", ["launch/make_tiny_model.py", "launch/export.py", "launch/evaluate.py",
                                    "launch/eval_mmeb.py", "data_prep/shard.py", "data_prep/builtin.py"])
def test_entry_script_runs_from_another_folder(script, tmp_path):
    r = subprocess.run([sys.executable, str(REPO / script), "--help"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "usage" in r.stdout.lower()


def test_package_imports_are_lazy():
    """`import pipeline` must stay cheap (the data tools import it in every worker)."""
    out = subprocess.run([sys.executable, "-c", "import pipeline, sys; print('torch' in sys.modules)"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
