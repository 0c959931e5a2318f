#!/usr/bin/env python3
"""Runs a command and prints one JSON line with its wall time, exit code, peak RSS (the kernel's VmHWM) and peak
anonymous memory (RssAnon sampled every 50 ms: Linux keeps no high-water mark of it; a file-backed memory map
counts in RSS, not here).
    python3 scripts/peakmem.py LABEL -- CMD ARGS..."""
import json
import subprocess
import sys
import time


def status(pid):
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("VmHWM", "RssAnon"):
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def main():
    if "--" not in sys.argv:
        sys.exit(__doc__)
    label = sys.argv[1]
    cmd = sys.argv[sys.argv.index("--") + 1:]
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    hwm = anon = 0
    while p.poll() is None:
        s = status(p.pid)
        hwm = max(hwm, s.get("VmHWM", 0))
        anon = max(anon, s.get("RssAnon", 0))
        time.sleep(0.05)
    wall = time.monotonic() - t0
    err = p.stderr.read().decode(errors="replace").strip().splitlines()
    print(json.dumps({"label": label, "rc": p.returncode, "wall_s": round(wall, 1), "peak_rss_gib": round(hwm / 2**20, 2),
                      "peak_anon_gib": round(anon / 2**20, 2), "last_stderr": err[-1][-300:] if err else ""}), flush=True)


main()
