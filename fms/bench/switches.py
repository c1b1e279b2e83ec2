"""The process-wide switches benchmarks flip or record, kept in this one place until they become config fields.

Global switches in use today (the lead turns these into config fields):
  - SSD prefill scan: fms.modules.ssm.use_ssd_scan(name), a process-wide context manager. Benchmarks go
    through scan_path() below (fms/bench/ssd.py, fms/bench/hybrid_sections.py, fms/bench/hybrid_mixer.py).
  - FMS_GEMV: read once at import by fms/triton/gemv.py ("0" keeps every projection on F.linear).
  - FMS_COMBO_KERNELS: read by fms/runtime/decode.py when it compiles a decode step ("0" turns inductor's
    combo kernels off).
No script sets the two environment variables itself; runs set them in the shell (A/B timings), and
every results file records their values (env_switches()).
"""

import os

from fms.modules.ssm import use_ssd_scan

# benchmark path name -> the scan use_ssd_scan selects for it
SCAN_OF_PATH = {"fast": "triton", "reference": "reference", "recurrent": "recurrent"}
ENV_SWITCHES = ("FMS_GEMV", "FMS_COMBO_KERNELS")


def scan_path(path: str):
    """A context in which the Mamba prefill scan is the benchmark path's ("fast", "reference", "recurrent")."""
    if path not in SCAN_OF_PATH:
        raise ValueError(f"unknown scan path {path!r}; allowed: {', '.join(SCAN_OF_PATH)}")
    return use_ssd_scan(SCAN_OF_PATH[path])


def env_switches() -> dict[str, str | None]:
    """The environment switches as this process sees them (None: unset, the default applies)."""
    return {name: os.environ.get(name) for name in ENV_SWITCHES}
