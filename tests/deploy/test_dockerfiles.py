"""deploy/docker, checked without a Docker engine: each Dockerfile is parsed (dockerfile-parse), and
what it promises is read back: multi-stage, non-root, no build tools in the final stage, tesseract
with Korean data and fonts, models mounted or baked; every path it COPYs from the build context
exists and is not excluded by .dockerignore; the command it starts exists in the CLI."""
from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from tests.conftest import ROOT
from tests.deploy.test_manifests import RENDERS, by_kind, check_command, containers

DOCKER = ROOT / "deploy" / "docker"
DOCKERFILES = {"cpu": DOCKER / "cpu.Dockerfile", "cuda": DOCKER / "cuda.Dockerfile"}
BUILD_TOOLS = {"gcc", "g++", "make", "build-essential", "cmake", "git", "clang", "python3-dev", "python3-pip",
               "python3-venv", "curl", "wget"}
NEEDED_PACKAGES = {"tesseract-ocr", "tesseract-ocr-kor", "fonts-nanum"}


def stages(path: Path) -> list[dict]:
    """[{name, base, instructions: [(instruction, value)]}] in order, comments dropped."""
    parser = DockerfileParser(str(path))
    out: list[dict] = []
    for item in parser.structure:
        if item["instruction"] == "COMMENT":
            continue
        if item["instruction"] == "FROM":
            parts = item["value"].split()
            out.append({"base": parts[0], "name": parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None,
                        "instructions": []})
        elif out:
            out[-1]["instructions"].append((item["instruction"], item["value"]))
    return out


def global_args(path: Path) -> dict[str, str]:
    parser = DockerfileParser(str(path))
    args = {}
    for item in parser.structure:
        if item["instruction"] == "FROM":
            break
        if item["instruction"] == "ARG":
            name, _, default = item["value"].partition("=")
            args[name] = default
    return args


def apt_packages(run: str) -> set[str]:
    packages = set()
    for command in re.split(r"&&|;", run):
        words = shlex.split(command.replace("\\\n", " "))
        if "apt-get" in words and "install" in words:
            packages |= {w for w in words[words.index("install") + 1:] if not w.startswith("-")}
    return packages


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; `!` re-includes; a pattern matching a folder
    covers what is under it."""
    excluded = False
    parts = path.split("/")
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        if pat == "**" or any(fnmatch.fnmatchcase(p, pat) or fnmatch.fnmatchcase(p, pat.replace("**/", ""))
                              for p in prefixes):
            excluded = not negate
    return excluded


def ignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_multi_stage_non_root_final_image(flavour):
    path = DOCKERFILES[flavour]
    st = stages(path)
    assert len(st) >= 3
    final = st[-1]
    assert final["name"] == "runtime"
    assert final["base"] == st[0]["base"], "the final stage starts from the same clean base, not from `build`"
    instructions = final["instructions"]
    users = [v for i, v in instructions if i == "USER"]
    assert users and users[-1].split(":")[0] == "10001", "runs as a numeric non-root user (runAsNonRoot can check it)"
    froms = [v for i, v in instructions if i == "COPY" and v.startswith("--from=")]
    assert {f.split()[0] for f in froms} == {"--from=build", "--from=models"}
    assert ("EXPOSE", "8080") in instructions
    env = " ".join(v for i, v in instructions if i == "ENV")
    for setting in ("HEALTH_ADDR=0.0.0.0:8080", "HF_HUB_OFFLINE=1", "YOLO_OFFLINE=1", "HOME=/tmp",
                    "PYTHONDONTWRITEBYTECODE=1", "HF_HOME=/models/hf", "YOLO_MODEL=/models/yolo/"):
        assert setting in env, setting


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_final_stage_has_ocr_and_fonts_and_no_build_tools(flavour):
    final = stages(DOCKERFILES[flavour])[-1]
    runs = [v for i, v in final["instructions"] if i == "RUN"]
    packages = set().union(*(apt_packages(r) for r in runs))
    assert NEEDED_PACKAGES <= packages
    assert not packages & BUILD_TOOLS, packages & BUILD_TOOLS
    assert not any(p.endswith("-dev") for p in packages)
    for run in runs:
        if "apt-get install" in run:
            assert "--no-install-recommends" in run and "rm -rf /var/lib/apt/lists/*" in run
        assert "pip install" not in run, "nothing is built or installed with pip in the final stage"


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_models_mounted_or_baked(flavour):
    path = DOCKERFILES[flavour]
    names = {s["name"]: s for s in stages(path)}
    assert global_args(path)["MODELS"] == "mounted"
    assert {"models-mounted", "models-baked", "models"} <= set(names)
    assert names["models"]["base"] == "models-${MODELS}"
    baked_runs = " ".join(v for i, v in names["models-baked"]["instructions"] if i == "RUN")
    assert "deploy/docker/fetch_models.py" in baked_runs


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_every_copied_path_exists_and_is_in_the_build_context(flavour):
    patterns = ignore_patterns()
    copied = 0
    for stage in stages(DOCKERFILES[flavour]):
        for instruction, value in stage["instructions"]:
            if instruction not in ("COPY", "ADD"):
                continue
            assert instruction == "COPY", "ADD fetches URLs and unpacks archives: COPY only"
            words = [w for w in value.split() if not w.startswith("--")]
            if value.startswith("--from="):
                continue
            assert len(words) >= 2
            for source in words[:-1]:
                assert (ROOT / source).exists(), f"{flavour}: COPY {source}: no such path in the repository"
                assert not dockerignore_excludes(source, patterns), f"{flavour}: COPY {source} is in .dockerignore"
                copied += 1
    assert copied >= 8


def test_dockerignore_keeps_the_context_small():
    patterns = ignore_patterns()
    for heavy in (".git", ".venv", ".adflow", "tests", "bench", "docs", "outbox/__pycache__", "deploy/k8s"):
        assert dockerignore_excludes(heavy, patterns), heavy
    for needed in ("pyproject.toml", "outbox/queue.py", "alembic/versions/0001_initial.py",
                   "deploy/docker/fetch_models.py"):
        assert not dockerignore_excludes(needed, patterns), needed


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_image_command_exists(flavour):
    final = stages(DOCKERFILES[flavour])[-1]
    [cmd] = [v for i, v in final["instructions"] if i == "CMD"]
    argv = json.loads(cmd)
    assert check_command(argv) == "workers start"
    workdir = [v for i, v in final["instructions"] if i == "WORKDIR"][-1]
    assert workdir == "/app"  # the manifests' `python cli.py ...` runs from here


def test_manifests_use_these_images():
    for name, resources in RENDERS.items():
        for deployment in by_kind(resources, "Deployment").values():
            flavour = "gpu" if deployment["metadata"]["name"] == "workers-gpu" else "cpu"
            for c in containers(deployment):
                assert f"/adflow-{flavour}:" in c["image"], (name, c["image"])
