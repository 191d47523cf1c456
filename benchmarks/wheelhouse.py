"""Fill ``.whl/`` with the wheels a lent GPU machine needs and lacks: it has torch, triton, nvcc
and ninja but cannot reach PyPI (the device tool carries ``.whl``; gpu_session.sh installs it).

    python benchmarks/wheelhouse.py            # here, once (`make wheelhouse`); .whl/ is git-ignored

What goes in:
  1. pip resolves, for the device's interpreter (CPython 3.12, manylinux x86-64) and against its
     own torch and triton (``DEVICE``), the packages the GPU phases import (``ROOTS``), each at
     this virtualenv's version (the versions the CPU suite passed with), everything else at
     requirements/cpu-constraints.txt's pins where it has one.
  2. Every package of that closure is carried, except the device's torch stack (torch, triton,
     the nvidia/cuda libraries and what only torch needs) and the packages the device image
     already has in a version that every requirement of the closure accepts.
  3. A dry-run install of ``.whl/*.whl`` exactly as the device runs it (``--no-index --no-deps``,
     for Python 3.12) proves every wheel's tags fit that interpreter, and the total stays inside
     the device tool's 64 MiB per call with the working tree.

Why resolve instead of listing wheels by hand: the hand-made list carried a cp311-only wheel
(pip then refuses the whole batch there, so nothing was installed) and transformers 5.25 without
the huggingface_hub >= 2.4 it checks at import (the image has 1.33).  The result is built in
``.whl.tmp`` and replaces ``.whl`` only when complete and checked.
"""
from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parent.parent
# What the GPU phases import beyond torch and triton: the training stack, the loss benchmark's
# Inf-CL, and the project's own install_requires that its modules import at load time.
ROOTS = ["deepspeed", "transformers", "peft", "webdataset", "inf_cl", "tokenizers", "safetensors", "accelerate",
         "pillow", "numpy", "pyyaml", "tqdm"]
ALWAYS_CARRY = {"deepspeed", "transformers", "peft", "webdataset", "inf-cl"}  # the code under test
# The device image (the device tool's KINDS.md, its pip list of 2026-11): the versions it reports.
DEVICE = {"python": "3.12", "python_full": "3.12.3", "torch": "2.11.0", "triton": "3.6.0",
          "has": {"huggingface-hub": "1.33.0", "tokenizers": "0.23.2", "accelerate": "1.15.0",
                  "safetensors": "0.8.0", "numpy": "2.5.2", "transformers": "5.17.0", "sentencepiece": "0.2.2"}}
TORCH_STACK = re.compile(r"^(torch|triton|nvidia-.*|cuda-.*|sympy|mpmath|networkx|setuptools)$")
# pip matches a manylinux tag exactly, so every one the image surely runs is named: its torch 2.11
# wheel is manylinux_2_28, so its glibc is at least 2.28 (a newer tag could be refused there,
# and pip then installs none of the batch)
PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(28, 4, -1)] + ["manylinux2014_x86_64", "manylinux2010_x86_64",
                                                                    "manylinux1_x86_64"]
LIMIT_MIB = 48  # of the device tool's 64 MiB per call, the rest for the working tree


def target_flags() -> list[str]:
    """pip's flags for wheels of the device's interpreter (``DEVICE["python"]``)."""
    plat = [x for p in PLATFORMS for x in ("--platform", p)]
    return ["--python-version", DEVICE["python"], "--implementation", "cp",
            "--abi", "cp" + DEVICE["python"].replace(".", ""), "--abi", "abi3", "--abi", "none", *plat,
            "--only-binary=:all:"]


def pip(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-m", "pip", *args], capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"wheelhouse: pip {' '.join(args[:2])} failed:\n{r.stdout[-2000:]}{r.stderr[-4000:]}")
    return r


def local_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def marker_env() -> dict:
    return {"python_version": DEVICE["python"], "python_full_version": DEVICE["python_full"], "os_name": "posix",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
            "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def resolve(work: Path, deepspeed_dir: Path) -> list[dict]:
    """pip's resolution for the device: [{name, version, requires_dist}] of the whole closure."""
    pins = [f"{r}=={v}" if (v := local_version(r)) else r for r in ROOTS]
    constraints = work / "constraints.txt"
    ours = (REPO / "requirements" / "cpu-constraints.txt").read_text().splitlines()
    keep = [x for x in ours if x.strip() and not x.startswith("#")
            and not TORCH_STACK.match(canonicalize_name(re.split(r"[=<>!~; \[]", x, maxsplit=1)[0]))]
    constraints.write_text("\n".join(keep + [f"torch=={DEVICE['torch']}", f"triton=={DEVICE['triton']}"]) + "\n")
    report = work / "report.json"
    pip("install", "--dry-run", "--ignore-installed", "-q", "--report", str(report), "--target", str(work / "t"),
        *target_flags(), "--find-links", str(deepspeed_dir), "-c", str(constraints), *pins,
        f"torch=={DEVICE['torch']}", f"triton=={DEVICE['triton']}")
    return [{"name": canonicalize_name(x["metadata"]["name"]), "version": x["metadata"]["version"],
             "requires_dist": x["metadata"].get("requires_dist", [])} for x in json.loads(report.read_text())["install"]]


def choose(closure: list[dict]) -> tuple[list[dict], dict[str, str]]:
    """(what to carry, {name: why not carried}) from the closure (see the module docstring)."""
    env = marker_env()
    specs: dict[str, list[Requirement]] = {}
    for pkg in closure:
        for text in pkg["requires_dist"]:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate(env):
                specs.setdefault(canonicalize_name(req.name), []).append(req)
    carry, skipped = [], {}
    for pkg in closure:
        name, have = pkg["name"], DEVICE["has"].get(pkg["name"])
        if TORCH_STACK.match(name):
            skipped[name] = "the device's own torch stack"
        elif name not in ALWAYS_CARRY and have and all(r.specifier.contains(have, prereleases=True)
                                                       for r in specs.get(name, [])):
            skipped[name] = f"the device has {have}, which every requirement accepts"
        else:
            carry.append(pkg)
    return carry, skipped


def check(dest: Path, work: Path) -> float:
    """Install ``dest`` as the device does (dry run, its interpreter's tags); size in MiB."""
    wheels = sorted(str(p) for p in dest.glob("*.whl"))
    names = [canonicalize_name(Path(w).name.split("-")[0]) for w in wheels]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        sys.exit(f"wheelhouse: two versions of {dupes} in {dest}: pip would refuse the whole install")
    pip("install", "--dry-run", "-q", "--no-index", "--no-deps", "--target", str(work / "check"), *target_flags(), *wheels)
    mib = sum(Path(w).stat().st_size for w in wheels) / 2**20
    if mib > LIMIT_MIB:
        sys.exit(f"wheelhouse: {mib:.1f} MiB of wheels is over the {LIMIT_MIB} MiB this script allows "
                 "(the device tool carries 64 MiB per call, working tree included)")
    return mib


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dest", type=Path, default=REPO / ".whl")
    ap.add_argument("--python-version", default=DEVICE["python"],
                    help="the interpreter the wheels are for (another one: to rehearse the install elsewhere)")
    args = ap.parse_args(argv)
    if args.python_version != DEVICE["python"]:  # what target_flags() and marker_env() describe
        DEVICE["python"], DEVICE["python_full"] = args.python_version, args.python_version + ".0"
    tmp_dest = args.dest.with_name(args.dest.name + ".tmp")
    shutil.rmtree(tmp_dest, ignore_errors=True)
    tmp_dest.mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="coma-wheelhouse-") as w:
        work = Path(w)
        # deepspeed publishes only a source archive: built here, no ops compiled (its JIT builds them there)
        ds_dir = work / "deepspeed"
        ds_version = local_version("deepspeed")
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(ds_dir), f"deepspeed=={ds_version}"], capture_output=True, text=True,
                           env={**os.environ, "DS_BUILD_OPS": "0"})
        if r.returncode != 0:
            sys.exit(f"wheelhouse: building the deepspeed wheel failed:\n{r.stderr[-3000:]}")
        carry, skipped = choose(resolve(work, ds_dir))
        pip("download", "-q", "--no-deps", *target_flags(), "--find-links", str(ds_dir), "-d", str(tmp_dest),
            *[f"{p['name']}=={p['version']}" for p in carry])
        mib = check(tmp_dest, work)
    shutil.rmtree(args.dest, ignore_errors=True)
    tmp_dest.rename(args.dest)
    for p in sorted(carry, key=lambda p: p["name"]):
        print(f"carry {p['name']}=={p['version']}")
    for name, why in sorted(skipped.items()):
        print(f"skip  {name}: {why}")
    print(f"{args.dest}: {len(carry)} wheels, {mib:.1f} MiB, checked to install for CPython {DEVICE['python']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
