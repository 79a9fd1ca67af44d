"""What the diagnosis ran on, and how much memory that machine has.

Speed, ETA and memory verdicts hold only for the machine they were measured on, so the report
carries its device, threads, versions and memory (``environment``). ``available_memory`` is what the
memory checks compare against: free GPU memory, or available RAM (/proc/meminfo, else psutil, else
sysconf), so that the estimate is judged against what is left, not what is installed.
"""

from __future__ import annotations

import os
import platform

import torch


def available_memory(device: torch.device) -> tuple[int | None, int | None, str]:
    """(available bytes, total bytes, what) of the device's memory."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(free), int(total), "free GPU memory"
    info: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                key, rest = line.split(":", 1)
                info[key] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    avail, total = info.get("MemAvailable"), info.get("MemTotal")
    if avail is None:
        try:
            import psutil  # optional

            vm = psutil.virtual_memory()
            avail, total = int(vm.available), int(vm.total)
        except Exception:
            try:
                page = os.sysconf("SC_PAGE_SIZE")
                avail = os.sysconf("SC_AVPHYS_PAGES") * page
                total = os.sysconf("SC_PHYS_PAGES") * page
            except (ValueError, OSError, AttributeError):
                return None, None, "available RAM"
    return avail, total, "available RAM"


def environment(device: torch.device) -> dict:
    """The report's ``environment``: what its speed and memory figures were measured on."""
    avail, total, _ = available_memory(device)
    env = {
        "device": device.type,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "memory_total_mb": round(total / 2**20) if total else None,
        "memory_available_mb": round(avail / 2**20) if avail else None,
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
    return env
