"""The start-up account: seconds from process start, part by part."""

import subprocess
import sys

from lean.monitor import StartUp, process_age


def test_a_process_age_is_read_from_the_system_not_guessed():
    script = "import time; time.sleep(0.3); from lean.monitor import process_age; print(process_age())"
    age = float(subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout)
    assert 0.3 <= age < 60  # the sleep, at least; and not the machine's uptime
    assert process_age() > 0


def test_start_up_names_each_part_and_their_sum():
    start_up = StartUp()
    start_up.parts["imports"] = 2.0  # as if the imports took 2 s
    start_up.mark("caches")
    line = str(start_up)
    total = 2.0 + start_up.parts["caches"]
    assert line.startswith(f"start-up: {total:.1f} s to the first step (imports 2.0, caches ")
