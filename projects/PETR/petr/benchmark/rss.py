"""The peak RSS of this process, for the benchmarks' CPU memory figures. Imports no torch."""

import resource

__all__ = ["peak_rss_mib"]


def peak_rss_mib() -> float:
    """This process's peak RSS, MiB. VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the
    parent through fork and exec, so a measurement subprocess would report at least its parent's
    size."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
