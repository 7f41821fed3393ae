"""py-spy around the consumer during a drain: where the event path spends its time."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

_LINE_NUMBER = re.compile(r":\d+\)$")


class Profiler:
    """``py-spy record`` of one process into ``path`` (raw collapsed stacks)."""

    def __init__(self, pid: int, path: str, rate: int = 250, thread_filter: str = "_read_loop") -> None:
        # The virtualenv's own, when it is run by path and not activated.
        spy = shutil.which("py-spy") or shutil.which("py-spy", path=os.path.dirname(sys.executable))
        if spy is None:
            raise RuntimeError("--profile needs py-spy: pip install py-spy")
        self.path = path
        self.thread_filter = thread_filter  # a frame every stack of the event path has
        self._process = subprocess.Popen(
            [spy, "record", "-r", str(rate), "-f", "raw", "-o", path, "--pid", str(pid),
             "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # py-spy attaches asynchronously

    def stop_and_summarise(self, top: int = 25) -> str:
        self._process.send_signal(signal.SIGINT)
        self._process.wait(30)
        return summarise(self.path, top, self.thread_filter)


def summarise(path: str, top: int = 25, thread_filter: str = "_read_loop") -> str:
    """Inclusive and self time per function, over the stacks of the event-path thread."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack or (thread_filter and thread_filter not in stack):
                continue
            n = int(count)
            total += n
            frames = [_LINE_NUMBER.sub(")", frame) for frame in stack.split(";")[1:]]
            for frame in set(frames):
                inclusive[frame] += n
            own[frames[-1]] += n
    if not total:
        return f"profile: no samples of the event path in {path}"
    lines = [f"profile of the event path ({total} samples, {path}):", "  inclusive  self  function"]
    for frame, n in inclusive.most_common(top):
        lines.append(f"  {100 * n / total:8.1f}% {100 * own[frame] / total:5.1f}%  {frame}")
    return "\n".join(lines)
