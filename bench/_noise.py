"""CPU noise from other processes (Linux /proc), so a benchmark on a shared box can tell when it was
disturbed. Used by throughput.py and _vllm_worker.py (stdlib only: it runs in both venvs).

    snap = others_snapshot()
    ... timed work ...
    cores = others_cores_since(snap)  # average cores used by processes outside our process tree
"""

from __future__ import annotations

import os
import time

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, cpu seconds) for every readable process."""
    table = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for name in entries:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                data = f.read()
        except OSError:
            continue
        # comm may contain spaces/parens: split after the last ')'.
        rest = data[data.rfind(")") + 2:].split()
        try:
            ppid, utime, stime = int(rest[1]), int(rest[11]), int(rest[12])
        except (IndexError, ValueError):
            continue
        table[int(name)] = (ppid, (utime + stime) / _TICK)
    return table


def _our_tree(table: dict[int, tuple[int, float]], root: int) -> set[int]:
    """root, all its descendants, and its ancestors (our launchers; not their other children)."""
    ours = {root}
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _) in table.items():
            if ppid in ours and pid not in ours:
                ours.add(pid)
                changed = True
    pid = root
    while pid in table and table[pid][0] > 1:
        pid = table[pid][0]
        ours.add(pid)
    return ours


def _system_busy_s() -> float | None:
    """CPU seconds all cores spent busy (user, nice, system, irq, softirq) since boot."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[1:8])
    return (user + nice + system + irq + softirq) / _TICK


def others_snapshot(root: int | None = None):
    """State to measure from: time, whole-machine busy CPU, and CPU of each of our processes."""
    root = os.getpid() if root is None else root
    table = proc_table()
    ours = _our_tree(table, root)
    return time.monotonic(), _system_busy_s(), {pid: table[pid][1] for pid in ours if pid in table}


def others_cores_since(snap, root: int | None = None) -> float | None:
    """Average number of cores used by everything outside our process tree since `snap`: the
    machine's busy time (/proc/stat, which also counts processes that came and went meanwhile) less
    our own processes' CPU time. None where /proc is unavailable."""
    t0, busy0, ours0 = snap
    root = os.getpid() if root is None else root
    busy1 = _system_busy_s()
    if busy0 is None or busy1 is None:
        return None
    table = proc_table()
    ours1 = {pid: table[pid][1] for pid in _our_tree(table, root) if pid in table}
    t1 = time.monotonic()
    ours_used = sum(max(ours1[p] - ours0.get(p, 0.0), 0.0) for p in ours1)
    return max(busy1 - busy0 - ours_used, 0.0) / max(t1 - t0, 1e-6)


def wait_idle(max_wait_s: float, threshold_cores: float = 0.1, sample_s: float = 2.0,
              log=lambda msg: None) -> float | None:
    """Wait (up to max_wait_s) until other processes use fewer than threshold_cores over sample_s.
    Returns the last measured load of others."""
    deadline = time.monotonic() + max_wait_s
    cores = None
    warned = False
    while True:
        snap = others_snapshot()
        time.sleep(sample_s)
        cores = others_cores_since(snap)
        if cores is None or cores < threshold_cores or time.monotonic() >= deadline:
            return cores
        if not warned:
            log(f"machine busy (other processes use {cores:.2f} cores); waiting up to {max_wait_s:.0f}s")
            warned = True


def timed_quiet(fn, *, wait_s: float = 0.0, max_noise: float = 0.1, retries: int = 0,
                log=lambda msg: None):
    """Run fn() timed; where other processes used more than max_noise cores meanwhile, wait for quiet
    and run it again (at most `retries` more times). Returns (result, elapsed_s, others_cores, tries)."""
    tries = 0
    while True:
        tries += 1
        if wait_s > 0:
            wait_idle(wait_s, threshold_cores=max_noise, log=log)
        snap = others_snapshot()
        t0 = time.perf_counter()
        result = fn()
        elapsed = time.perf_counter() - t0
        noise = others_cores_since(snap)
        if noise is None or noise <= max_noise or tries > retries:
            if noise is not None and noise > max_noise:
                log(f"WARNING: other processes used {noise:.2f} cores during the timed run; "
                    "the number is disturbed")
            return result, elapsed, noise, tries
        log(f"other processes used {noise:.2f} cores during the timed run ({elapsed:.1f}s); "
            f"retrying ({tries}/{retries})")
