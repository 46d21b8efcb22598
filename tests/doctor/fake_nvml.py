"""A stand-in for the pynvml module (NVML cannot exist on a machine without an NVIDIA driver).

It answers what NVML answers on real machines: names, memory in bytes, the driver version string
and the CUDA version as an integer (12020 for 12.2). Old pynvml releases return bytes for strings.
"""
from __future__ import annotations

from types import SimpleNamespace


class NVMLError(Exception):
    def __init__(self, value=999):
        self.value = value
        super().__init__(value)

    def __str__(self):
        return {9: "Driver Not Loaded", 12: "NVML Shared Library Not Found", 999: "Unknown Error"}.get(self.value, "Unknown Error")


class FakeNVML:
    NVMLError = NVMLError

    def __init__(self, driver: str, cuda: int, gpus: list, fail_init: int = 0, as_bytes: bool = False,
                 no_capability: bool = False):
        self.driver, self.cuda, self.gpus = driver, cuda, gpus
        self.fail_init, self.as_bytes, self.no_capability = fail_init, as_bytes, no_capability
        self.shutdown = False

    def _s(self, text):
        return text.encode() if self.as_bytes else text

    def nvmlInit(self):
        if self.fail_init:
            raise NVMLError(self.fail_init)

    def nvmlShutdown(self):
        self.shutdown = True

    def nvmlSystemGetDriverVersion(self):
        return self._s(self.driver)

    def nvmlSystemGetCudaDriverVersion(self):
        return self.cuda

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return self.gpus[i]

    def nvmlDeviceGetName(self, handle):
        return self._s(handle["name"])

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(total=handle["total"], free=handle["free"], used=handle["total"] - handle["free"])

    def nvmlDeviceGetCudaComputeCapability(self, handle):
        if self.no_capability:
            raise NVMLError(3)
        return handle["cc"]


# Readings as nvidia-smi / NVML report them on such machines.
RTX_4090 = {"name": "NVIDIA GeForce RTX 4090", "total": 25757220864, "free": 25217466368, "cc": (8, 9)}
RTX_2060_LAPTOP = {"name": "NVIDIA GeForce RTX 2060", "total": 6442450944, "free": 6175260672, "cc": (7, 5)}
RTX_3060 = {"name": "NVIDIA GeForce RTX 3060", "total": 12884901888, "free": 12591300608, "cc": (8, 6)}
TESLA_T4 = {"name": "Tesla T4", "total": 16106127360, "free": 15642329088, "cc": (7, 5)}
