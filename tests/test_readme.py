"""The README stays true: every `cli.py` command and flag it shows exists, every setting the code
reads is in its configuration table, its make targets exist, and `cli.py --help` is fast."""
from __future__ import annotations

import re
import subprocess
import sys

import typer

from tests.conftest import ROOT

README = (ROOT / "README.md").read_text(encoding="utf-8")
# Set by the code for its own children, not by users.
INTERNAL_VARIABLES = {"ADFLOW_WORKER_SLOT"}


def is_group(command) -> bool:
    return hasattr(command, "commands")  # typer may ship its own click: no isinstance


def command_tree():
    from cli import app

    return typer.main.get_command(app)


def readme_invocations() -> list[str]:
    """Every `cli.py ...` or `workers ...` invocation in code spans and code blocks (the file
    layout's block names files, not commands)."""
    text = README.replace("```\n" + "\n".join(layout_block()) + "\n```", "")
    snippets = re.findall(r"```.*?```", text, re.S) + re.findall(r"`([^`\n]+)`", text)
    found = []
    for snippet in snippets:
        for line in snippet.replace("\\|", "/").splitlines():  # `a\|b` in a table cell is "a or b"
            for match in re.finditer(r"(?:cli\.py|(?<![\w/])workers(?= start))\s+([^|]*)", line):
                found.append(match.group(0).strip())
    return found


def resolve(root, words: list[str]) -> tuple:
    command = root
    rest = list(words)
    while is_group(command) and rest and rest[0] in command.commands:
        command = command.commands[rest.pop(0)]
    return command, rest


def test_every_cli_command_and_flag_in_the_readme_exists():
    root = command_tree()
    invocations = readme_invocations()
    assert len(invocations) >= 15, invocations
    seen_commands = set()
    for text in invocations:
        words = text.split()
        if words[0] == "workers":
            words = ["workers", *words[1:]]
        else:
            words = words[1:]
        if not words or words[0].startswith("-"):
            continue
        command, rest = resolve(root, words)
        assert command is not root, f"README names an unknown command: {text}"
        if is_group(command):
            assert not rest or rest[0].startswith(("-", "[")), f"README names an unknown subcommand: {text}"
        seen_commands.add(command.name)
        known = {opt for param in command.params for opt in [*param.opts, *param.secondary_opts]} | {"--help"}
        for flag in re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", " ".join(rest)):
            assert flag in known, f"README shows {flag} for `{text}`, which that command does not accept ({sorted(known)})"
    top = set(root.commands)
    assert {"demo", "submit", "watch", "report", "status", "replay-failed", "run-stage", "db", "workers"} <= top
    assert {"demo", "submit", "watch", "report", "status", "replay-failed", "run-stage", "upgrade", "start"} <= seen_commands


def test_every_setting_the_code_reads_is_in_the_configuration_table():
    table = README[README.index("## Configuration"):README.index("## Model profiles")]
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", table))
    read = set()
    pattern = re.compile(r"""(?:environ\.get|environ\[|getenv|env_float|env_bool|_batch_setting|_setting)\(\s*["']([A-Z][A-Z0-9_]+)["']"""
                         r"""|^[A-Z_]*ENV[A-Z_]*\s*=\s*["']([A-Z][A-Z0-9_]+)["']""", re.M)
    for folder in ("outbox", "workers", "stages", "console"):
        for path in (ROOT / folder).rglob("*.py"):
            for match in pattern.finditer(path.read_text(encoding="utf-8")):
                read.add(match.group(1) or match.group(2))
    read |= {"HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"}  # stages.models.offline() loops over them
    missing = sorted(read - documented - INTERNAL_VARIABLES)
    assert not missing, f"settings read by the code but missing from the README's configuration table: {missing}"


def test_make_targets_in_the_readme_exist():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, re.M))
    named = set(re.findall(r"`?make ([a-z][a-z-]*)", README))
    assert {"run", "test"} <= named
    assert named <= targets, named - targets
    assert re.search(r"^run:.*\n(?:.*\n)*?\t\$\(PY\) cli\.py demo", makefile, re.M)


def test_cli_help_imports_no_model_library():
    """What keeps `--help` fast: no model library at import. Its time is a benchmark
    (bench/cli_startup.py), not a test: a 0.5 s bound here failed on a fresh clone at 0.54 s."""
    code = ("import sys, runpy; sys.argv = ['cli.py', '--help']\n"
            "try:\n    runpy.run_path('cli.py', run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'ultralytics', 'PIL') if m in sys.modules]\n"
            "print('HEAVY', heavy)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert "HEAVY []" in done.stdout, done.stdout[-500:] + done.stderr


def layout_block() -> list[str]:
    text = README.split("## Layout", 1)[1].split("```", 2)[1]
    return text.strip("\n").splitlines()


def test_the_layout_in_the_readme_matches_the_tree():
    """Every module of the four packages is listed under its folder, and every listed file exists."""
    listed, folder = set(), None
    for line in layout_block():
        name = line.split()[0]
        if not line.startswith(" "):
            folder = name.rstrip("/") if name.endswith("/") else None
            assert (ROOT / name).exists(), name
        elif folder:
            listed.add(f"{folder}/{name}")
    for path in sorted(listed):
        assert (ROOT / path).exists(), f"README lists {path}, which does not exist"
    modules = {str(p.relative_to(ROOT)) for folder in ("outbox", "workers", "stages", "console")
               for p in (ROOT / folder).glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    assert sorted(modules - listed) == [], "modules missing from the README's layout"
