"""Machine-wide memory and GPU readings for the monitor; every source is optional and may fail quietly."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class GpuReading:
    name: str
    used: int
    total: int
    utilisation: int | None


@dataclass
class SystemReading:
    ram_used: int | None = None
    ram_total: int | None = None
    gpus: list[GpuReading] = field(default_factory=list)


def _ram() -> tuple[int | None, int | None]:
    try:
        import psutil

        memory = psutil.virtual_memory()
        return memory.total - memory.available, memory.total
    except ImportError:
        pass
    try:
        fields = {}
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            fields[key] = int(rest.split()[0]) * 1024
        return fields["MemTotal"] - fields["MemAvailable"], fields["MemTotal"]
    except (OSError, KeyError, ValueError, IndexError):
        return None, None


class _Nvml:
    """NVML through pynvml (nvidia-ml-py) when installed and a driver answers; otherwise no GPUs."""

    def __init__(self) -> None:
        self._handles: list | None = None

    def read(self) -> list[GpuReading]:
        try:
            import pynvml
        except ImportError:
            return []
        try:
            if self._handles is None:
                pynvml.nvmlInit()
                self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            readings = []
            for handle in self._handles:
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                name = pynvml.nvmlDeviceGetName(handle)
                util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
                readings.append(GpuReading(name if isinstance(name, str) else name.decode(), memory.used, memory.total, util))
            return readings
        except Exception:  # any NVML failure (no driver, lost GPU) just hides the GPU line
            self._handles = []
            return []


_nvml = _Nvml()


def probe_system() -> SystemReading:
    used, total = _ram()
    return SystemReading(ram_used=used, ram_total=total, gpus=_nvml.read())
