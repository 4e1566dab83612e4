"""Peak memory of a stretch of training, above what was held when measuring started (CPU or CUDA)."""
from __future__ import annotations

import ctypes
from typing import Optional

import torch


class PeakMemory:
    """Peak memory of the training steps of one run, above the memory held when measuring starts.

    CUDA: the allocator's peak. CPU: the process's peak resident set (Linux VmHWM, reset through
    /proc/self/clear_refs), after returning freed heap pages to the OS (malloc_trim) so that memory
    an earlier run or an evaluation freed does not count. ``pause()``/``resume()`` bracket work that
    must not count (the held-out evaluation)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "rss_hwm"
        self.base = 0
        self.best = 0
        self.started = False

    @staticmethod
    def _status(key: str) -> Optional[int]:
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def _reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            self.kind = "unavailable"

    def _current_peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device)
        return self._status("VmHWM") or 0

    def start(self) -> None:
        self._reset()
        self.base = (torch.cuda.memory_allocated(self.device) if self.device.type == "cuda"
                     else self._status("VmRSS") or 0)
        self.best = self.base
        self.started = True

    def pause(self) -> None:
        if self.started:
            self.best = max(self.best, self._current_peak())

    def resume(self) -> None:
        if self.started:
            self._reset()

    def peak_mib(self) -> Optional[float]:
        if not self.started or self.kind == "unavailable":
            return None
        return (max(self.best, self._current_peak()) - self.base) / 2 ** 20
