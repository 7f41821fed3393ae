"""Instructions per event of the event path, counted, not timed: ``python -m tests.bench.instructions``.

Timings on a shared machine move by ±10 % between identical runs; the instructions the CPU
executes do not. The drain's traffic (``--tasks`` tasks, the Redis fast path's payloads) is
fed, in one process under valgrind's callgrind, through ``EventDecoder.feed`` into the
sidecar's whole pipeline (``--stage full``), the fold without sinks (``fold``) or the decoder
alone (``decode``). A second run feeds nothing; the difference over the events is the cost
of an event. Memory effects (cache misses) are not in this figure: confirm a change with the
drain benchmark too. Needs valgrind (``apt-get install valgrind``); about two minutes a stage.

Compare two versions by running each one's copy of this with its own install.
"""

from __future__ import annotations

import argparse
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile

_COLLECTED = re.compile(r"Collected : (\d+)")


def _feed(payloads_file: str, stage: str, count: int) -> None:
    """The child: build the stage, feed ``count`` payloads (0: none)."""
    from celery_sidecar.monitor.intake.decoder import EventDecoder
    from tests.bench.fold import fold_pipeline, sidecar_pipeline

    with open(payloads_file, "rb") as f:
        payloads = pickle.load(f)
    if stage == "decode":
        decoder = EventDecoder(lambda _event: None, lambda _reason: None, on_checked=lambda *_: None)
    else:
        pipeline = sidecar_pipeline() if stage == "full" else fold_pipeline()
        decoder = EventDecoder(pipeline.handle, lambda _reason: None, on_checked=pipeline.fold_checked)
    for payload in payloads[:count]:
        decoder.feed(payload)


def _instructions(payloads_file: str, stage: str, count: int) -> int:
    argv = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-m",
            "tests.bench.instructions", "--child", payloads_file, stage, str(count)]
    run = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"})
    found = _COLLECTED.search(run.stderr)
    if run.returncode != 0 or found is None:
        raise SystemExit(f"valgrind failed (exit {run.returncode}):\n{run.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _feed(sys.argv[2], sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=int, default=20_000, help="tasks of drain traffic (4.2 events each)")
    parser.add_argument("--stage", choices=("full", "fold", "decode"), action="append",
                        help="what the events go through (repeatable; default: full)")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("needs valgrind: apt-get install valgrind")
    from tests.bench.traffic import Shape, build

    messages, totals = build(args.tasks, Shape(seed=11))
    with tempfile.NamedTemporaryFile(suffix=".pickle", delete=False) as f:
        pickle.dump([m.payload for m in messages], f)
    try:
        print(f"{totals.events:,} events of {args.tasks:,} tasks; instructions per event (valgrind callgrind)")
        for stage in args.stage or ["full"]:
            base = _instructions(f.name, stage, 0)
            fed = _instructions(f.name, stage, len(messages))
            print(f"  {stage:<8} {(fed - base) / totals.events:10,.0f}", flush=True)
    finally:
        os.unlink(f.name)


if __name__ == "__main__":
    main()
