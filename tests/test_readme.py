"""The README's commands must work: every script, flag, config override, config file, Makefile target
and pip extra it names exists; its Python snippets import what exists; its config reference lists
every key of pipeline/config.py with the right default.  (The demo runs the commands for real.)"""
import ast
import dataclasses
import re
import shlex
import subprocess
import sys
import typing
from functools import lru_cache

import pytest

from conftest import REPO
from pipeline.config import Config, format_value, schema_keys

README = (REPO / "README.md").read_text(encoding="utf-8")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LAUNCHERS = {"deepspeed", "torchrun", "srun", "python", "python3"}


def blocks(*langs):
    return [body for lang, body in FENCE.findall(README) if lang in langs]


def shell_commands():
    """Every command line of the bash blocks: continuations joined, comments and prompts removed,
    split on && / ; / |."""
    cmds = []
    for body in blocks("bash", "sh"):
        text = re.sub(r"\\\n\s*", " ", body)
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            try:
                toks = shlex.split(line, comments=True)
            except ValueError as e:
                raise AssertionError(f"README command does not parse: {line!r} ({e})")
            cur = []
            for t in toks + [";"]:
                if t in ("&&", ";", "|", "||"):
                    if cur:
                        cmds.append(cur)
                    cur = []
                else:
                    cur.append(t)
    return cmds


def strip_env(cmd):
    while cmd and re.match(r"^[A-Z_][A-Z0-9_]*=", cmd[0]):
        cmd = cmd[1:]
    return cmd


def script_of(cmd):
    """(script path, its arguments) for python/deepspeed/torchrun/srun commands, else None."""
    cmd = strip_env(cmd)
    if not cmd:
        return None
    exe = cmd[0].rsplit("/", 1)[-1]
    if exe not in LAUNCHERS:
        return None
    for i, t in enumerate(cmd[1:], 1):
        if t.endswith(".py"):
            return t, cmd[i + 1:]
        if t == "-m" and cmd[i + 1].split(".")[0] in ("pipeline", "coma_kernels", "data_prep", "benchmarks", "launch"):
            return cmd[i + 1].replace(".", "/") + ".py", cmd[i + 2:]
        if t in ("-m", "-c"):
            return None
    return None


@lru_cache(maxsize=None)
def sources_of(script):
    """The script's text plus that of the repo modules it imports (argparse often lives there)."""
    path = REPO / script
    text = path.read_text(encoding="utf-8")
    out = [text]
    for node in ast.walk(ast.parse(text)):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        for name in names:
            for cand in (REPO / (name.replace(".", "/") + ".py"), path.parent / (name.split(".")[-1] + ".py")):
                if cand.is_file() and cand != path:
                    out.append(cand.read_text(encoding="utf-8"))
    return "\n".join(out)


@lru_cache(maxsize=None)
def help_text(script):
    out = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    return out.stdout + out.stderr


def config_key_exists(dotted):
    cls = Config
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return False
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return False
        tp = hints[part]
        cls = tp if dataclasses.is_dataclass(tp) else None
    return True


def test_readme_has_commands():
    cmds = shell_commands()
    assert len(cmds) >= 25, "the README lost its commands"
    scripts = {s[0] for c in cmds if (s := script_of(c))}
    assert len(scripts) >= 10


@pytest.mark.parametrize("cmd", shell_commands(), ids=lambda c: " ".join(c)[:60])
def test_command_references_exist(cmd):
    cmd = strip_env(cmd)
    exe = cmd[0].rsplit("/", 1)[-1]
    if exe == "make":
        targets = set(re.findall(r"^([a-zA-Z][\w-]*):", (REPO / "Makefile").read_text(), re.M))
        for t in cmd[1:]:
            if "=" not in t:
                assert t in targets, f"make {t}: no such Makefile target"
        return
    if exe == "sbatch":
        paths = [t for t in cmd[1:] if t.endswith(".sbatch")]
        assert paths and all((REPO / p).is_file() for p in paths), cmd
        return
    if exe == "pip" or (len(cmd) > 2 and cmd[1:3] == ["-m", "pip"]):
        for t in cmd:
            m = re.match(r'^(?:-e\s*)?\.\[([\w,]+)\]$', t)
            if m:
                setup = (REPO / "setup.py").read_text()
                for extra in m.group(1).split(","):
                    assert f'"{extra}":' in setup, f"pip extra [{extra}] is not defined in setup.py"
        return
    found = script_of(cmd)
    if found is None:
        return
    script, args = found
    path = REPO / script
    assert path.is_file(), f"README runs {script}, which does not exist"
    source = sources_of(script)
    for a in args:
        if a.startswith("--") and len(a) > 2:
            flag = a.split("=", 1)[0]
            if "." in flag:  # a config override --section.key=value
                assert config_key_exists(flag[2:]), f"{script}: {flag} is not a key of pipeline/config.py"
                continue
            if f'"{flag}"' in source or f"'{flag}'" in source:
                continue
            assert flag in help_text(script), f"{script} has no flag {flag}"
    for a in args + [t for t in cmd if "/" in t]:
        value = a.split("=", 1)[-1]
        if re.match(r"^(launch|ds_configs|data_prep|benchmarks|pipeline|tests)/[\w/.-]+\.(py|yaml|json|sbatch|sh)$", value):
            assert (REPO / value).is_file(), f"README names {value}, which does not exist"


def test_python_snippets_import_real_names():
    for body in blocks("python"):
        tree = ast.parse(body)  # a syntax error fails here
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in ("pipeline", "coma_kernels"):
                mod = __import__(node.module, fromlist=[a.name for a in node.names])
                for a in node.names:
                    assert hasattr(mod, a.name), f"README imports {a.name} from {node.module}, which has none"


def _flat_defaults():
    return {key: default for key, default, _ in schema_keys()}


_fmt = format_value


def test_config_reference_lists_every_key_with_its_default():
    rows = dict(re.findall(r"^\|\s*`([\w.\[\]]+)`\s*\|\s*`([^`]*)`\s*\|", README, re.M))
    missing = [k for k in _flat_defaults() if k not in rows]
    assert not missing, f"README config reference lacks {missing}"
    wrong = {k: (rows[k], _fmt(v)) for k, v in _flat_defaults().items() if rows[k] != _fmt(v)}
    assert not wrong, f"README config reference shows wrong defaults (README, actual): {wrong}"
    stale = [k for k in rows if "." in k and k.split(".")[0] in {f.name for f in dataclasses.fields(Config)}
             and k not in _flat_defaults()]
    assert not stale, f"README config reference lists keys that no longer exist: {stale}"


def test_first_part_matches_makefile():
    make = (REPO / "Makefile").read_text()
    torch_pin = re.search(r"^TORCH \?= (\S+)", make, re.M).group(1)
    head = README.split("\n## ", 3)
    first = "\n## ".join(head[:3])
    assert "make demo" in first and "make test" in first
    assert f"pip install {torch_pin}" in first, f"README's install must pin {torch_pin} like the Makefile"
    pins = re.search(r"^CONSTRAINTS \?= (\S+)", make, re.M).group(1)
    assert (REPO / pins).is_file(), f"the Makefile's constraints file {pins} is missing"
    assert f'pip install -c {pins} -e ".[dev]"' in first, f"README's install must use {pins} like the Makefile"
    assert 'pip install $(PIN) -e ".[dev]"' in make.replace("$(PY) -m pip", "pip")


def test_reproducing_section_is_folded_in():
    """docs/reproducing.md (the converters' owner writes it) appears in the README verbatim, one
    heading level down, so the two never disagree."""
    doc = REPO / "docs" / "reproducing.md"
    if not doc.exists():
        pytest.skip("no docs/reproducing.md")
    body = doc.read_text(encoding="utf-8").rstrip().replace("\n### ", "\n#### ")
    body = body.replace("## Reproducing the paper", "### Reproducing the paper's data", 1)
    assert body in README, "README's 'Reproducing the paper's data' differs from docs/reproducing.md: re-fold it"
