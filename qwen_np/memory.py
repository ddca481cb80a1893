"""Whether a model's weights fit in the memory this process may still take (Linux; elsewhere no check).

Without the check, a checkpoint too large for the machine is read until the kernel's out-of-memory
killer ends the process: "Killed" (exit status 137) and no message, after a while of swapping. The
room is counted generously: memory the kernel can free (the file cache) and free swap count as room,
so only a load that cannot fit is refused. Where several limits apply, the tightest counts:

- the machine's: MemAvailable + SwapFree in /proc/meminfo (and, where the kernel does not
  overcommit, CommitLimit - Committed_AS);
- a memory cgroup's (a container, a systemd slice): its limit minus what its processes use, file
  cache apart, for this process's cgroup and each one above it (cgroup v2: memory.max; v1:
  memory.limit_in_bytes).
"""

import os
from pathlib import Path

from .config import QwenNPError


def meminfo_fields(text):  # the text of /proc/meminfo -> {"MemAvailable": bytes, ...}
    fields = {}
    for line in text.splitlines():  # "MemAvailable:   24226064 kB"
        name, _, value = line.partition(":")
        parts = value.split()
        if parts and parts[0].isdigit():
            fields[name] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    return fields


def memory_cgroups(mountinfo, cgroup):  # texts of /proc/self/{mountinfo,cgroup} -> [(mount point, path, version)]
    mounts = {}  # version -> (the cgroup path mounted there, mount point)
    for line in mountinfo.splitlines():
        fields, _, rest = line.partition(" - ")  # mountinfo(5): ID PARENT DEV ROOT POINT ... - TYPE SOURCE OPTIONS
        fields, rest = fields.split(), rest.split()
        if len(fields) >= 5 and len(rest) >= 3:
            if rest[0] == "cgroup2":
                mounts[2] = fields[3], fields[4]
            elif rest[0] == "cgroup" and "memory" in rest[2].split(","):
                mounts[1] = fields[3], fields[4]
    found = []
    for line in cgroup.splitlines():  # "0::/PATH" (v2), "N:memory:/PATH" (v1)
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        version = 2 if hierarchy == "0" else 1 if "memory" in controllers.split(",") else None
        if version in mounts:
            root, point = mounts[version]
            inside = os.path.relpath(path, root)  # a container's mount shows only its own subtree
            found.append((point, "." if inside.startswith("..") else inside, version))
    return found


def cgroup_limit_file(directory, version):  # -> the file that holds a memory cgroup's limit
    return directory / ("memory.max" if version == 2 else "memory.limit_in_bytes")


def cgroup_room(directory, version):  # -> bytes under this cgroup's own limit, or None where it sets none
    limit = cgroup_limit_file(directory, version).read_text().strip()
    if limit == "max" or int(limit) >= 2**62:  # none set (v1 writes its largest page count in bytes, about 2**63)
        return None
    used = int((directory / ("memory.current" if version == 2 else "memory.usage_in_bytes")).read_text())
    stat = dict(line.split() for line in (directory / "memory.stat").read_text().splitlines() if line.count(" ") == 1)
    cache, shmem = ("file", "shmem") if version == 2 else ("total_cache", "total_shmem")
    return int(limit) - used + int(stat.get(cache, 0)) - int(stat.get(shmem, 0))  # file cache can be freed


def memory_room(root=Path("/")):  # -> (bytes, where the figure comes from) of the tightest limit, or None
    try:
        fields = meminfo_fields((root / "proc/meminfo").read_text())
    except (OSError, ValueError):  # not Linux
        return None
    if "MemAvailable" not in fields:  # kernels before 3.14
        return None
    swap = fields.get("SwapFree", 0)
    rooms = [(fields["MemAvailable"] + swap, "MemAvailable + SwapFree in /proc/meminfo")]
    try:  # strict overcommit: the kernel refuses memory beyond what it has promised (proc(5))
        strict = (root / "proc/sys/vm/overcommit_memory").read_text().strip() == "2"
    except OSError:
        strict = False
    if strict and "CommitLimit" in fields and "Committed_AS" in fields:
        rooms.append((fields["CommitLimit"] - fields["Committed_AS"],
                      "CommitLimit - Committed_AS in /proc/meminfo, as vm.overcommit_memory is 2"))
    try:
        cgroups = memory_cgroups((root / "proc/self/mountinfo").read_text(), (root / "proc/self/cgroup").read_text())
    except (OSError, ValueError):  # no cgroups, or files of another form: the machine's figure alone
        cgroups = []
    for point, inside, version in cgroups:
        top = root / point.lstrip("/")
        directory = top / inside
        while True:  # this process's cgroup, then each one above it, up to the top of the mount
            try:
                room = cgroup_room(directory, version)
            except (OSError, ValueError):  # no such file at this level (the root cgroup has none)
                room = None
            if room is not None:
                where = f"the limit in {cgroup_limit_file(directory, version)}, less what its processes use"
                rooms.append((room + swap, where + (", plus free swap" if swap else "")))
            if directory == top:
                break
            directory = directory.parent
    return min(rooms)


def check_fits(source, needed, low_memory_needed, low_memory):  # bytes the weights take -> None, or QwenNPError
    """Refuses a load whose weights cannot fit in the memory the process may still take."""
    room = memory_room()
    if room is None or needed <= room[0]:
        return
    held = "with its matrices in bfloat16 (low_memory)" if low_memory else "in float32"
    if low_memory:
        hint = "choose a smaller model, or free some memory"
    elif low_memory_needed <= room[0]:
        hint = (f"load it with low_memory=True (--low-memory on the command line), which keeps its matrices in "
                f"bfloat16: {gb(low_memory_needed)}")
    else:
        hint = f"even with low_memory=True they need {gb(low_memory_needed)}: choose a smaller model"
    raise QwenNPError(f"{source}: its weights need {gb(needed)} of memory {held}, more than the {gb(room[0])} "
                      f"free ({room[1]}); {hint}")


def gb(size):  # bytes -> "30.5 GB", or "61.2 MB" below 0.1 GB
    return f"{size / 1e9:,.1f} GB" if size >= 1e8 else f"{size / 1e6:,.1f} MB"
