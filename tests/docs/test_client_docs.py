"""The examples of docs/clients/ and the README run as a user would paste them after `kvgate up`: one real gateway
with the bundled catalog, every ```python block in a fresh interpreter and every ```sh block with
curl in bash, with the documented address replaced by the test gateway's."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvgate.catalog import bundled_catalog_path, load_catalog
from kvgate.cli.gateway import Gateway
from kvgate.cli.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs" / "clients"
PAGES = ["index.md", "openai.md", "responses.md", "anthropic-messages.md", "embeddings-tokenize.md",
         "tritonclient-grpc.md", "tritonclient-http.md", "curl-generate.md"]
DOC_ADDRESS = "127.0.0.1:8080"  # what every example uses: `kvgate up`'s default
EXAMPLE_TIMEOUT_S = 45
# ```lang at the start of a line, up to the closing fence.
FENCE = re.compile(r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<code>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
# The one kind of sh block that is not run: starting the gateway, which the fixture does.
NOT_RUN = re.compile(r"^(kvgate up\b.*|#.*|)$")


def blocks(lang: str, pages: list[Path]) -> list[tuple[str, str]]:
    """(id, code) of every fenced block in `lang`, in page order."""
    out = []
    for page in pages:
        found = [m["code"] for m in FENCE.finditer(page.read_text()) if m["lang"] == lang]
        out += [(f"{page.name}:{lang}{i}", code) for i, code in enumerate(found, 1)]
    return out


CLIENT_PAGES = [DOCS / p for p in PAGES]
# The README's quick start installs things; its python and curl examples run like the pages'.
PYTHON = blocks("python", [*CLIENT_PAGES, ROOT / "README.md"])
CURL = [(i, code) for i, code in blocks("sh", [*CLIENT_PAGES, ROOT / "README.md"]) if "curl " in code]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    gw = Gateway(load_catalog(bundled_catalog_path()), run_dir=tmp_path_factory.mktemp("docs-gw"), port=free_port())
    gw.start(timeout_s=60)
    yield gw
    gw.stop()


def for_gateway(code: str, gw: Gateway) -> str:
    assert DOC_ADDRESS in code, "examples must use the documented address"
    return code.replace(DOC_ADDRESS, f"{gw.host}:{gw.port}")


def test_every_page_has_examples_and_every_sh_block_is_run() -> None:
    assert sorted(p.name for p in DOCS.glob("*.md")) == sorted(PAGES)
    for page in PAGES[1:]:
        assert any(i.startswith(f"{page}:python") for i, _ in PYTHON), f"{page} has no python example"
    for block_id, code in blocks("sh", CLIENT_PAGES):
        if "curl " not in code:
            assert all(NOT_RUN.match(line.strip()) for line in code.splitlines()), f"{block_id} would not be run"
    for page in PAGES:  # relative links between the pages and to the repo resolve
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", (DOCS / page).read_text()):
            assert (DOCS / target).exists(), f"{page}: broken link {target}"


@pytest.mark.parametrize("code", [c for _, c in PYTHON], ids=[i for i, _ in PYTHON])
def test_python_example(gateway: Gateway, code: str, tmp_path: Path) -> None:
    # A fresh interpreter, run from an empty directory: what a user pasting the block has.
    result = subprocess.run([sys.executable, "-c", for_gateway(code, gateway)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S)
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"


@pytest.mark.parametrize("code", [c for _, c in CURL], ids=[i for i, _ in CURL])
def test_curl_example(gateway: Gateway, code: str, tmp_path: Path) -> None:
    # --max-time bounds each curl; the subprocess timeout bounds the block.
    script = for_gateway(code, gateway).replace("curl ", "curl --max-time 30 ")
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path,
                            capture_output=True, text=True, timeout=EXAMPLE_TIMEOUT_S)
    assert result.returncode == 0, f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.stdout.strip(), f"no output\nstderr:\n{result.stderr}"
