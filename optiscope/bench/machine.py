"""The machine a run measures, and where the run came from: the device's description (CPU model,
cores and cache, or the GPU with its data-sheet peak bandwidth), free memory, load average, and
the versions and commit a results file records.
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

__all__ = ["PEAK_BANDWIDTH", "peak_bandwidth", "describe_device", "cpu_llc_bytes", "versions",
           "git_commit", "load_average", "available_bytes", "utc_now"]

# Peak memory bandwidth (bytes/s) of known GPUs, from the vendors' data sheets; matched against
# torch.cuda.get_device_name in order, first match wins. Others fall back to the measured
# device-to-device copy bandwidth.
PEAK_BANDWIDTH: tuple[tuple[str, float, str], ...] = (
    (r"GH200", 4.0e12, "GH200 (H100 96 GB HBM3)"),
    (r"H200", 4.8e12, "H200 (HBM3e)"),
    (r"H100.*NVL", 3.9e12, "H100 NVL"),
    (r"H100.*PCIe", 2.0e12, "H100 PCIe"),
    (r"H100", 3.35e12, "H100 SXM"),
    (r"A100.*80GB.*PCIe", 1.935e12, "A100 80GB PCIe"),
    (r"A100.*80GB", 2.039e12, "A100 80GB SXM"),
    (r"A100", 1.555e12, "A100 40GB"),
    (r"L40S", 8.64e11, "L40S"),
    (r"L4\b", 3.0e11, "L4"),
    (r"A10G", 6.0e11, "A10G"),
    (r"V100", 9.0e11, "V100"),
    (r"RTX 4090", 1.008e12, "RTX 4090"),
)


def peak_bandwidth(gpu_name: str) -> tuple[float, str] | None:
    """The data-sheet peak bandwidth of a GPU and the entry that matched, or None if unknown."""
    for pattern, peak, entry in PEAK_BANDWIDTH:
        if re.search(pattern, gpu_name, flags=re.IGNORECASE):
            return peak, entry
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpu_llc_bytes() -> int | None:
    """Size of the largest CPU cache (the last level), or None when sysfs does not say."""
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    sizes = []
    for index in base.glob("index*"):
        try:
            text = (index / "size").read_text().strip()
        except OSError:
            continue
        m = re.fullmatch(r"(\d+)([KMG]?)", text)
        if m:
            unit = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2)]
            sizes.append(int(m.group(1)) * unit)
    return max(sizes) if sizes else None


def _slug(text: str) -> str:
    """'Intel(R) Xeon(R) Processor' -> 'intel-xeon': trademark signs and the words every CPU
    name carries say nothing about the machine."""
    text = re.sub(r"\((r|tm)\)|\b(processor|cpu)\b", " ", text.lower())
    return re.sub(r"[^a-z0-9]+", "-", text).strip("-") or "unknown"


def describe_device(device: torch.device) -> dict:
    """What the results file says about the device (its ``slug`` names the file)."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"type": "cuda", "name": props.name, "memory_bytes": props.total_memory,
                "compute_capability": f"{props.major}.{props.minor}",
                "multiprocessors": props.multi_processor_count,
                "l2_cache_bytes": getattr(props, "L2_cache_size", None),
                "cuda": torch.version.cuda, "slug": f"cuda-{_slug(props.name)}"}
    model = _cpu_model()
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"type": "cpu", "name": model, "cores": os.cpu_count(), "usable_cores": usable,
            "torch_threads": torch.get_num_threads(), "memory_bytes": _meminfo("MemTotal"),
            "llc_bytes": cpu_llc_bytes(), "slug": f"cpu-{_slug(model)}"}


def versions() -> dict:
    """Versions of Python, torch, Triton (None when absent) and optiscope."""
    import optiscope

    def dist(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None
    return {"python": platform.python_version(), "torch": torch.__version__,
            "triton": dist("triton"), "optiscope": optiscope.__version__}


def git_commit() -> dict:
    """The commit of the optiscope checkout, and whether its working tree differs (None: no git)."""
    import optiscope

    where = Path(optiscope.__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=where, capture_output=True, text=True,
                                 timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None
    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain")  # untracked files count: the harness may be one
    return {"commit": commit, "dirty": None if commit is None or dirty is None else bool(dirty)}


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def available_bytes(device: torch.device) -> int | None:
    """Free memory on the device (CPU: MemAvailable), or None when unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return _meminfo("MemAvailable")


def utc_now() -> str:
    """The time in UTC, to the second, as results files record it."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
