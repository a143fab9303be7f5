"""One line describing the machine a benchmark ran on (recorded beside every result table)."""

from __future__ import annotations

import os
import platform


def describe_machine() -> str:
    """``"<CPU model>, <n> cores visible"`` (the CPU model from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        names = []
    return f"{names[0] if names else platform.machine()}, {os.cpu_count()} cores visible"
