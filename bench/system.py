"""What machine and software a result came from, made in one place: `run_metadata()` (the fields
every result row carries: device, hardware sentence, versions, git sha, time, load), the results
folder a run writes to (`new_results_dir()`: device, date, time and sha in its name, never an
existing folder), and how much of a set of tensors transparent huge pages back (the page size
changes a CPU step's speed: bench/RESULTS.md, "Huge pages").

Everything here degrades to "unknown" rather than failing: the GPU machine runs a copy of the
working tree that may have no .git, and not every kernel exposes /proc/self/smaps.
"""
import bisect
import datetime
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_ROOT = REPO_ROOT / "bench" / "results"


def cpu_model():
    match = re.search(r"^model name\s*:(.*)$", _read("/proc/cpuinfo") or "", re.MULTILINE)
    return (match.group(1).strip() if match
            else platform.processor() or platform.machine() or "unknown CPU")


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def device_slug(device):
    """`cpu-intel-xeon-2core`, `cuda-nvidia-h100-80gb-hbm3`: a folder name for the results."""
    name = re.sub(r"\((r|tm)\)|\b(cpu|processor)\b|@.*$", " ", device_name(device).lower())
    if device.type == "cpu":
        name += f" {os.cpu_count()}core"
    return re.sub(r"[^a-z0-9]+", "-", f"{device.type} {name}").strip("-")


def new_results_dir(device, suffix=""):
    """`bench/results/<device>-<YYYY-MM-DD-HHMMSS>-<sha>[-suffix]/`, created now; a name already
    taken (two runs in one second) gets `-2`, `-3`: a run never writes into another's folder."""
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M%S")
    sha = git_sha().replace("-dirty", "+")[:13]
    base = f"{device_slug(device)}-{stamp}-{sha}" + (f"-{suffix}" if suffix else "")
    for attempt in range(1, 1000):
        path = RESULTS_ROOT / (base if attempt == 1 else f"{base}-{attempt}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"no free results folder name under {RESULTS_ROOT} for {base}")


def _read(path):
    try:
        return Path(path).read_text().strip()
    except OSError:
        return None


def proc_bytes(path, field):
    """`field` of a /proc file that counts in kB (`MemTotal`, `VmRSS`), in bytes; None if
    unreadable."""
    match = re.search(rf"^{field}:\s+(\d+) kB", _read(path) or "", re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def thp_mode():
    """The kernel's transparent-huge-page policy, e.g. `madvise` (the bracketed choice)."""
    text = _read("/sys/kernel/mm/transparent_hugepage/enabled")
    match = re.search(r"\[(\w+)\]", text or "")
    return match.group(1) if match else "unknown"


def hardware_sentence(device):
    """One sentence on the hardware, for results.md."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return (f"{props.name} ({props.total_memory / 2**30:.0f} GiB, {props.multi_processor_count} "
                f"SMs), host CPU {cpu_model()} with {os.cpu_count()} logical cores.")
    threads = torch.get_num_threads()
    try:
        import numba
        numba_threads = numba.get_num_threads()
    except Exception:
        numba_threads = "?"
    memory = (proc_bytes("/proc/meminfo", "MemTotal") or float("nan")) / 2**30
    return (f"{cpu_model()} CPU, {os.cpu_count()} logical cores (torch uses {threads} threads, "
            f"numba {numba_threads}), {memory:.0f} GiB RAM, transparent huge pages: "
            f"{thp_mode()}.")


def load_average():
    """The 1-minute load average (runnable threads; over the core count means contention)."""
    try:
        return float(_read("/proc/loadavg").split()[0])
    except (AttributeError, ValueError, IndexError):
        return None


def run_metadata(device, command, *, quick=False, **settings):
    """The fields every result row of a run carries (see `bench.results`), made once per run:
    where it ran, on what software, at which commit, when, and how loaded the machine was."""
    return {
        "command": command,
        "device": device.type,
        "device_name": device_name(device),
        "hardware": hardware_sentence(device),
        **versions(),
        "git_sha": git_sha(),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "load_average_at_start": load_average(),
        "quick": bool(quick),
        "settings": settings,
    }


def versions():
    """Installed versions, read from package metadata: importing triton only to ask would cost
    a CPU run a second, and would fix its interpreter mode too early."""
    from importlib import metadata
    out = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("triton", "numba", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_sha():
    """Short commit of the working tree, `-dirty` when tracked files have uncommitted changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO_ROOT,
                             capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout
        return sha + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _anon_huge_page_map():
    """Sorted (start, end, AnonHugePages bytes) of this process's mappings, from smaps."""
    text = _read("/proc/self/smaps")
    if text is None:
        return None
    regions, current = [], None
    for line in text.splitlines():
        head = re.match(r"^([0-9a-f]+)-([0-9a-f]+) ", line)
        if head:
            current = [int(head.group(1), 16), int(head.group(2), 16), 0]
            regions.append(current)
        elif line.startswith("AnonHugePages:") and current is not None:
            current[2] = int(line.split()[1]) * 1024
    return sorted(regions)


def huge_page_fraction(tensors):
    """Fraction of the bytes of CPU `tensors` that huge pages back (None if unknowable).

    smaps reports per mapping, and neighbouring mappings may merge, so a mapping's huge-page
    bytes are shared out by how much of it the tensors cover: an estimate, good to a few %.
    """
    tensors = [t for t in tensors if t.device.type == "cpu" and t.numel() > 0]
    regions = _anon_huge_page_map()
    if not tensors or not regions:
        return None
    starts = [r[0] for r in regions]
    covered = {}  # region index -> bytes of tensors inside it
    seen = set()
    for t in tensors:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in seen:  # views of one arena count once
            continue
        seen.add(key)
        lo, hi = key, key + storage.nbytes()
        i = max(bisect.bisect_right(starts, lo) - 1, 0)
        while i < len(regions) and regions[i][0] < hi:
            overlap = min(hi, regions[i][1]) - max(lo, regions[i][0])
            if overlap > 0:
                covered[i] = covered.get(i, 0) + overlap
            i += 1
    total = sum(covered.values())
    if total == 0:
        return None
    huge = sum(min(regions[i][2], nbytes) for i, nbytes in covered.items())
    return huge / total
