#!/usr/bin/env python3
"""Fetches the `real` model profile's weights into one folder, laid out the way the images expect
them at /models:

    /models/hf/hub/...          Hugging Face cache (VLM_MODEL, TRANSLATION_MODEL), read with HF_HOME=/models/hf
    /models/yolo/<name>.pt      the YOLO weights, read with YOLO_MODEL=/models/yolo/<name>.pt

Used at image build time (`--build-arg MODELS=baked`) and by the Kubernetes Job that fills the
models volume (deploy/k8s/jobs/fetch-models.yaml). Needs network access to the model hubs; the
workers themselves never download anything (HF_HUB_OFFLINE=1, YOLO_OFFLINE=1).

    python deploy/docker/fetch_models.py --out /models [--skip-yolo] [--skip-hf]
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("MODEL_DIR", "/models"), help="target folder (default /models)")
    parser.add_argument("--skip-hf", action="store_true", help="do not fetch the Hugging Face models")
    parser.add_argument("--skip-yolo", action="store_true", help="do not fetch the YOLO weights")
    return parser


def main(argv: list[str] | None = None) -> int:
    from stages.models import DEFAULT_TRANSLATION_MODEL, DEFAULT_VLM_MODEL, DEFAULT_YOLO_MODEL

    args = build_parser().parse_args(argv)
    out = Path(args.out)
    # Downloads are the point here: lift the offline switches the images set for the workers.
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "YOLO_OFFLINE"):
        os.environ.pop(name, None)

    if not args.skip_hf:
        from huggingface_hub import snapshot_download

        for variable, default in (("VLM_MODEL", DEFAULT_VLM_MODEL), ("TRANSLATION_MODEL", DEFAULT_TRANSLATION_MODEL)):
            repo = os.environ.get(variable) or default
            if Path(repo).exists():
                print(f"{variable}={repo} is a local path: nothing to fetch")
                continue
            path = snapshot_download(repo_id=repo, cache_dir=str(out / "hf" / "hub"))
            print(f"{variable}={repo} -> {path}")

    if not args.skip_yolo:
        name = Path(os.environ.get("YOLO_MODEL") or DEFAULT_YOLO_MODEL).name
        folder = out / "yolo"
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / name).is_file():
            from ultralytics.utils.downloads import attempt_download_asset

            cwd = os.getcwd()
            os.chdir(folder)
            try:
                attempt_download_asset(name)
            finally:
                os.chdir(cwd)
        if not (folder / name).is_file():
            print(f"YOLO weights {name} could not be fetched", file=sys.stderr)
            return 1
        print(f"YOLO_MODEL=/models/yolo/{name} -> {folder / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
