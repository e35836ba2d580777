"""`kvgate engines render CATALOG OUT_DIR`: what each GPU engine of a catalog needs to start as the
catalog describes it (also `python -m engines.assets CATALOG OUT_DIR`).

For every model whose endpoints are real engines (not `sim`), OUT_DIR/<model>/ gets:

- `serve.sh`: what the engine's container runs (docker-compose.yml's `gpu` profile runs
  `sh /kvgate/assets/<model>/serve.sh`), so a changed catalog needs a render and a restart, never
  an edit of the compose file;
- `protocol: openai`: `extra-llm-api-options.yaml` for trtllm-serve (trtllm_serve.py);
- `protocol: triton`: `triton/`, the model repository of the TensorRT-LLM ensemble (triton_repo.py),
  filled from the templates of the Triton image (`--triton-templates`).

Paths written into these files are the containers': the catalog's folder (the deployment root) is
mounted at /kvgate in every container, so OUT_DIR and every file the catalog names must be inside it.
This module does the file I/O; what goes into the files is rendered by pure functions.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import yaml

from engines import trtllm_serve, triton_repo
from engines.engine_settings import (
    CONTAINER_ROOT,
    EngineAssetError,
    EngineLimits,
    EngineSettings,
    PathMap,
    engine_settings,
)
from kvgate.catalog import SIM, CatalogError, Model, load_catalog

SERVE_SCRIPT = "serve.sh"
TRTLLM_OPTIONS = "extra-llm-api-options.yaml"
TRITON_REPOSITORY = "triton"


@dataclass(frozen=True)
class RenderOptions:
    limits: EngineLimits = EngineLimits()
    triton: triton_repo.TritonOptions = triton_repo.TritonOptions()
    # NVIDIA's inflight_batcher_llm folder of the Triton image's TensorRT-LLM version (triton models only).
    triton_templates: Path | None = None
    host_root: Path | None = None  # the deployment root; default: the catalog's folder
    container_root: PurePosixPath = CONTAINER_ROOT


def model_dir_name(name: str) -> str:
    """A folder name for a model name (which may hold '/', ':', '@')."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def serve_script(argv: list[str], model: str) -> str:
    return (f"#!/bin/sh\n# kvgate engines render: the engine of model {model!r}. Rendered from the catalog: "
            f"render again rather than edit.\nexec {shlex.join(argv)}\n")


def model_assets(s: EngineSettings, model_dir: PurePosixPath, templates: dict[str, str] | None,
                 triton: triton_repo.TritonOptions = triton_repo.TritonOptions()) -> dict[str, str]:
    """Files of one engine, by path under its folder, which the containers see at `model_dir`."""
    if s.protocol == "openai":
        options = model_dir / TRTLLM_OPTIONS
        return {TRTLLM_OPTIONS: yaml.safe_dump(trtllm_serve.extra_llm_api_options(s), sort_keys=False),
                SERVE_SCRIPT: serve_script(trtllm_serve.argv(s, options), s.model)}
    if templates is None:
        raise EngineAssetError(f"model {s.model!r}: a Triton model needs --triton-templates, the image's "
                               "/app/all_models/inflight_batcher_llm (docs/deploy.md shows how to copy it out)")
    repository = triton_repo.render_repository(templates, s, triton)
    files = {f"{TRITON_REPOSITORY}/{path}": text for path, text in repository.items()}
    argv = triton_repo.tritonserver_argv(s, model_dir / TRITON_REPOSITORY)
    return {**files, SERVE_SCRIPT: serve_script(argv, s.model)}


def load_templates(folder: Path) -> dict[str, str]:
    """Text files of an inflight_batcher_llm folder by relative path (bytecode caches left out)."""
    if not folder.is_dir():
        raise EngineAssetError(f"--triton-templates {folder} is not a folder")
    return {p.relative_to(folder).as_posix(): p.read_text() for p in sorted(folder.rglob("*"))
            if p.is_file() and "__pycache__" not in p.parts}


def engine_models(catalog_models: list[Model]) -> list[Model]:
    """The models served by real engines; `sim` ones are started by the simulator instead."""
    return [m for m in catalog_models if SIM not in m.endpoints]


def render_assets(catalog_path: Path, out_dir: Path, options: RenderOptions = RenderOptions()) -> list[Path]:
    """Writes every engine model's files into out_dir/<model>/ (replacing what a previous render left
    there) and returns the files written. Raises CatalogError for an invalid catalog and
    EngineAssetError, naming every model that cannot be rendered, before writing anything."""
    catalog = load_catalog(catalog_path)
    paths = PathMap(options.host_root or catalog_path.parent, options.container_root)
    templates = load_templates(options.triton_templates) if options.triton_templates else None
    rendered: dict[str, dict[str, str]] = {}
    problems: list[str] = []
    for model in engine_models(catalog.models):
        try:
            config = json.loads(model.kv.config_json.read_text()) if model.kv.config_json else {}
            s = engine_settings(model, config, paths, options.limits)
            name = model_dir_name(model.name)
            rendered[name] = model_assets(s, paths(out_dir / name), templates, options.triton)
        except EngineAssetError as e:
            problems.append(str(e))
    if problems:
        raise EngineAssetError("\n".join(problems))
    written = []
    for name, files in rendered.items():
        folder = out_dir / name
        shutil.rmtree(folder, ignore_errors=True)  # files a previous render had and this one has not
        for relative, text in files.items():
            target = folder / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)
            written.append(target)
    return written


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engines.assets", description=__doc__.split("\n\n")[0])
    p.add_argument("catalog", type=Path)
    p.add_argument("out_dir", type=Path, help="inside the deployment root, e.g. deploy/assets")
    p.add_argument("--triton-templates", type=Path, default=None,
                   help="the Triton image's /app/all_models/inflight_batcher_llm, copied out")
    p.add_argument("--triton-streaming", action="store_true",
                   help="decoupled tensorrt_llm model: token streaming, but no unary infer")
    p.add_argument("--max-batch-size", type=int, default=EngineLimits.max_batch_size,
                   help="PyTorch backend (an HF checkpoint); a TensorRT engine keeps its build's")
    p.add_argument("--max-num-tokens", type=int, default=EngineLimits.max_num_tokens,
                   help="PyTorch backend (an HF checkpoint); a TensorRT engine keeps its build's")
    p.add_argument("--root", type=Path, default=None,
                   help="the folder mounted in every container (default: the catalog's folder)")
    p.add_argument("--container-root", type=PurePosixPath, default=CONTAINER_ROOT,
                   help="where the containers mount it")
    return p.parse_args(argv)


def options_from(args: argparse.Namespace) -> RenderOptions:
    return RenderOptions(limits=EngineLimits(args.max_batch_size, args.max_num_tokens),
                         triton=triton_repo.TritonOptions(decoupled=args.triton_streaming),
                         triton_templates=args.triton_templates, host_root=args.root,
                         container_root=args.container_root)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        written = render_assets(args.catalog, args.out_dir, options_from(args))
    except (CatalogError, EngineAssetError) as e:
        print(e, file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
