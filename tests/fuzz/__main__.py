"""`python -m tests.fuzz --target NAME --runs N`: fuzz one parser (tests/fuzz/targets.py), or all of them.

Engines: `builtin` (tests/fuzz/engine.py: deterministic, no dependency; the suite runs it) and
`atheris` (coverage-guided libFuzzer, `pip install atheris`; ext_proc is instrumented). Both start from
tests/fuzz/corpus/<target>/. Findings (crashes; hangs: over 1 s twice, over 5 s for atheris) are
written to --findings and the run exits 1.

    python -m tests.fuzz --target openai_chat --runs 1000000 --engine atheris
    python -m tests.fuzz --runs 20000            # every target, the builtin engine
"""

from __future__ import annotations

import argparse
import hashlib
import shlex
import sys
import tempfile
import time
from pathlib import Path

# Nothing of ext_proc is imported before atheris instruments it (with_atheris): targets are imported late.
CORPUS = Path(__file__).parent / "corpus"


def _save(findings: Path, target: str, data: bytes, why: str) -> Path:
    findings.mkdir(parents=True, exist_ok=True)
    path = findings / f"{target}-{hashlib.sha1(data).hexdigest()[:12]}"
    path.write_bytes(data)
    path.with_suffix(".txt").write_text(why + "\n")
    return path


def builtin(names: list[str], runs: int, seed: int, findings: Path) -> int:
    from tests.fuzz import engine
    from tests.fuzz.targets import TARGETS

    failed = 0
    for name in names:
        target = TARGETS[name]
        report = engine.run(target.run, name, engine.corpus(target.corpus), runs, seed)
        print(report, flush=True)
        for data, why in report.crashes[:20]:
            print(f"  crash: {why[:200]} -> {_save(findings, name, data, why)}")
        for data, took in report.hangs[:20]:
            print(f"  hang: {took:.2f} s -> {_save(findings, name, data, f'took {took:.2f} s')}")
        failed += bool(report.crashes or report.hangs)
    return 1 if failed else 0


def with_atheris(name: str, runs: int, seed: int, findings: Path, extra: list[str]) -> int:
    import atheris

    with atheris.instrument_imports(include=["ext_proc"]):
        from tests.fuzz.targets import TARGETS
    target = TARGETS[name]
    corpus_dir = CORPUS / target.corpus
    work = findings / f"corpus-{name}"  # what libFuzzer adds; the committed seeds stay as they are
    work.mkdir(parents=True, exist_ok=True)
    # -rss_limit_mb: libFuzzer's own tables grow with every string comparison atheris reports (the
    # anthropic_messages target reached 2.2 GB over 10^6 inputs, past the 2 GB default, while a plain loop
    # over 60,000 of them keeps the interpreter at 80 MB); a leak in a parser would still pass 4 GB.
    argv = [sys.argv[0], str(work), str(corpus_dir), f"-runs={runs}", f"-seed={seed or 1}", "-timeout=5",
            "-rss_limit_mb=4096", f"-artifact_prefix={findings}/{name}-", "-max_len=65536", "-print_final_stats=1",
            *extra]
    started = time.monotonic()

    from tests.fuzz import engine

    def one(data: bytes) -> None:
        target.run(data)

    def mutator(data: bytes, max_size: int, seed: int) -> bytes:
        """libFuzzer's byte mutations, and half the time the builtin engine's (JSON-aware) ones."""
        rng = engine.random.Random(seed)
        if rng.random() < 0.5:
            return atheris.Mutate(data, max_size)
        return engine.mutate(data, rng, [data])[:max_size]

    atheris.Setup(argv, one, custom_mutator=mutator)
    try:
        atheris.Fuzz()
    finally:
        print(f"{name}: atheris ran for {time.monotonic() - started:.0f} s", flush=True)
    return 0


TARGET_NAMES = ["anthropic_messages", "grpc_frames", "grpc_infer", "grpc_lookups", "grpc_stream", "headers",
                "kserve_binary", "kserve_json", "openai_chat", "openai_completions", "openai_embeddings",
                "openai_responses", "routed_calls", "triton_generate"]  # tests/fuzz/targets.py


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", choices=TARGET_NAMES, action="append",
                        help="a target (repeatable); default: every one")
    parser.add_argument("--runs", type=int, default=10_000, help="inputs per target")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine", choices=["builtin", "atheris"], default="builtin")
    parser.add_argument("--findings", type=Path, default=Path(tempfile.gettempdir()) / "kvgate-fuzz")
    args, extra = parser.parse_known_args(argv)
    names = args.target or TARGET_NAMES
    print("$ python -m tests.fuzz " + shlex.join(argv if argv is not None else sys.argv[1:]), flush=True)
    if args.engine == "atheris":
        if len(names) != 1:
            parser.error("atheris fuzzes one --target per process")
        return with_atheris(names[0], args.runs, args.seed, args.findings, extra)
    return builtin(names, args.runs, args.seed, args.findings)


if __name__ == "__main__":
    raise SystemExit(main())
