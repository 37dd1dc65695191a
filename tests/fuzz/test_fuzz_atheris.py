"""Coverage-guided fuzzing of the KCP codec and instructions (atheris_kcp.py),
for a bounded time in every run, and the replay of every input kept in
tests/fuzz/corpus/ (regressions found before, and hand-picked seeds), which
runs whether atheris is installed or not.

A failing input found by atheris is copied into tests/fuzz/corpus/ (commit
it with the fix: it is replayed from then on) and the test fails with its
traceback.
"""

from __future__ import annotations

import importlib.util
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from fuzz import grammar
from fuzz.kcp_target import LIMITS, check_input, make_input

HERE = Path(__file__).resolve().parent
CORPUS = HERE / "corpus"


@pytest.mark.parametrize("path", sorted(CORPUS.iterdir()), ids=lambda path: path.name)
def test_kept_inputs_still_hold(path: Path) -> None:
    check_input(path.read_bytes())


def seeds(directory: Path, seed: int, count: int = 300) -> None:
    """Requests from the grammar, some damaged, under every size limit."""
    rng = random.Random(seed)
    for i in range(count):
        wire = b"".join(grammar.message(rng) for _ in range(rng.randint(1, 5)))
        if rng.random() < 0.5:
            wire = grammar.mutate(rng, wire, rng.randint(1, 4))
        data = make_input(rng.randrange(len(LIMITS)), rng.randrange(256), wire)
        (directory / f"seed-{i}").write_bytes(data)


@pytest.mark.skipif(importlib.util.find_spec("atheris") is None, reason="atheris not installed")
def test_atheris_finds_no_failing_input(
    tmp_path: Path,
    fuzz_seed: int,
    fuzz_seconds: Callable[[float], float],
    fuzz_summary: Callable[[str], None],
) -> None:
    seconds = fuzz_seconds(8.0)
    work = tmp_path / "corpus"
    work.mkdir()
    seeds(work, fuzz_seed)
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    command = [
        sys.executable,
        str(HERE / "atheris_kcp.py"),
        str(work),  # new coverage lands here
        str(CORPUS),  # read only
        f"-max_total_time={int(seconds)}",
        f"-seed={fuzz_seed}",
        f"-dict={HERE / 'kcp.dict'}",
        "-max_len=2048",
        "-timeout=10",
        "-rss_limit_mb=2048",
        "-print_final_stats=1",
        f"-artifact_prefix={artifacts}/",
    ]
    print(f"atheris: seed {fuzz_seed}, {seconds} s (replay: KAIROI_FUZZ_SEED={fuzz_seed})")
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=seconds + 120, cwd=tmp_path
    )
    found = sorted(artifacts.iterdir())
    kept = []
    for path in found:
        target = CORPUS / path.name
        shutil.copyfile(path, target)
        kept.append(str(target.relative_to(HERE.parents[1])))
    assert result.returncode == 0 and not found, (
        f"atheris (seed {fuzz_seed}) found a failing input, kept as {kept}:\n"
        + result.stderr[-4000:]
    )
    stats = dict(re.findall(r"^stat::(\w+):\s+(\d+)", result.stderr, re.MULTILINE))
    runs = int(stats.get("number_of_executed_units", 0))
    assert runs > 0, result.stderr[-2000:]
    summary = (
        f"atheris, seed {fuzz_seed}: {runs} inputs in {seconds:.0f} s "
        f"({stats.get('new_units_added', '?')} new coverage units, "
        f"{len(list(work.iterdir()))} in the corpus)"
    )
    fuzz_summary(summary)
    print(summary)
