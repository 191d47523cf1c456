"""The installed project must not make transformers believe Hugging Face's `kernels` package
is present (our import package is also called `kernels`)."""
import subprocess
import sys

from conftest import REPO


def test_transformers_does_not_see_hf_kernels():
    code = (
        "import importlib.util, sys\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "assert spec is not None and spec.origin.startswith(sys.argv[1]), spec\n"
        "from transformers.utils import import_utils as iu\n"
        "assert not iu.is_kernels_available(), 'transformers thinks HF kernels is installed'\n"
        "from transformers.utils import is_flash_attn_2_available\n"
        "is_flash_attn_2_available()\n"
        "print('ok')\n"
    )
    # cwd = repo root puts our `kernels` first on sys.path, the worst case for the probe.
    out = subprocess.run([sys.executable, "-c", code, str(REPO)], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")


def test_package_imports_are_lazy():
    """`import pipeline` must stay cheap (the data tools import it in every worker)."""
    out = subprocess.run([sys.executable, "-c", "import pipeline, sys; print('torch' in sys.modules)"],
                         cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
