"""Coverage-guided fuzzing of the KCP codec and instructions with atheris (libFuzzer).

    .venv/bin/python tests/fuzz/atheris_kcp.py WORK_CORPUS tests/fuzz/corpus \
        -max_total_time=25 -artifact_prefix=/tmp/kcp-

takes libFuzzer's options; new coverage goes into the first corpus directory,
a failing input into `<artifact_prefix>crash-<sha1>`. kcp_target.py says what
is checked. test_fuzz_atheris.py runs it for a bounded time in the normal
test run and keeps what it finds in tests/fuzz/corpus/.
"""

from __future__ import annotations

import sys
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, as under pytest

# Instrument the code under test (codec and instructions) so that libFuzzer
# sees its coverage. The reference parser is left out: instrumenting it too
# halves the inputs tried per second.
with atheris.instrument_imports(include=["kairoi_trio.protocols.kcp"]):
    from fuzz.kcp_target import check_input


def main() -> None:
    atheris.Setup(sys.argv, check_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
