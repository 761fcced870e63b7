"""Memory of a child process, for tests that bound what a run holds.

Prepend :data:`PROBE` to a child script (``python -c``): it defines ``peak_kb()`` (``VmHWM``,
this process's peak RSS) and ``rss_kb()`` (``VmRSS``, now). ``ru_maxrss`` of a child would also
count the forked parent's pages before ``exec``, i.e. the test runner's memory.
"""

from __future__ import annotations

PROBE = r'''
def _status_kb(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")

def peak_kb():
    return _status_kb("VmHWM")

def rss_kb():
    return _status_kb("VmRSS")
'''
