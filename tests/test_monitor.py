"""The start-up account: seconds from process start, part by part."""

import time
from pathlib import Path

from lean.monitor import StartUp, process_age


def test_a_process_age_is_read_from_the_system_not_guessed():
    clock, before = time.monotonic(), process_age()
    time.sleep(0.1)  # an interval to measure, however long it really takes
    after, elapsed = process_age(), time.monotonic() - clock
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    assert 0 < before < uptime and abs((after - before) - elapsed) < 0.05  # ticking with the clock (10 ms ticks)


def test_start_up_names_each_part_and_their_sum():
    start_up = StartUp()
    start_up.parts["imports"] = 2.0  # as if the imports took 2 s
    start_up.mark("caches")
    line = str(start_up)
    total = 2.0 + start_up.parts["caches"]
    assert line.startswith(f"start-up: {total:.1f} s to the first step (imports 2.0, caches ")
