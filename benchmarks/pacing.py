"""Send-time pacing for the load generator: the fixed or Poisson schedule of send times, and the clocks
that wake the event loop at them (a timerfd on Linux, the loop's own timers elsewhere)."""

from __future__ import annotations

import asyncio
import ctypes
import functools
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Final, Protocol

import numpy as np

__all__ = ["Clock", "LoopClock", "make_clock", "schedule"]


def schedule(
    rate: float, duration_s: float, *, warmup_s: float = 0.0, poisson: bool = False, seed: int = 0
) -> tuple[np.ndarray, int]:
    """Send times in seconds from the start, and how many of them fall in the warm-up.

    The measured window is [warmup_s, warmup_s + duration_s); a fixed schedule puts a request exactly
    at warmup_s + k / rate.
    """
    if not (rate > 0 and duration_s > 0 and warmup_s >= 0):
        raise ValueError(f"need rate > 0, duration_s > 0, warmup_s >= 0; got {rate}, {duration_s}, {warmup_s}")
    if not poisson:
        n_warm = math.floor(warmup_s * rate + 1e-9)
        n_meas = max(1, round(duration_s * rate))
        return warmup_s + np.arange(-n_warm, n_meas, dtype=np.float64) / rate, n_warm
    rng = np.random.default_rng(seed)
    end = warmup_s + duration_s
    expected = end * rate
    gaps = rng.exponential(1.0 / rate, size=int(expected + 6 * math.sqrt(expected) + 16))
    times = np.cumsum(gaps)
    while times[-1] < end:  # astronomically rare with the 6-sigma margin, but never silently short
        times = np.concatenate([times, times[-1] + np.cumsum(rng.exponential(1.0 / rate, size=len(times)))])
    times = times[times < end]
    return times, int(np.searchsorted(times, warmup_s))


class Clock(Protocol):
    """Calls back once at an absolute time.monotonic() value; arm() replaces the previous arming."""

    def arm(self, when: float) -> None: ...
    def close(self) -> None: ...


class _TimerfdClock:
    """A Linux timerfd watched by the event loop: wakes within ~50 µs of the due time.

    The event loops' own timers have millisecond granularity (libuv's clock; epoll's timeout), which
    would add up to 1 ms of artificial latency to every request, and waiting less than that makes
    uvloop spin. A timerfd costs one epoll wake-up per tick, sleeps precisely and never spins.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._libc = _libc()
        fd = self._libc.timerfd_create(_CLOCK_MONOTONIC, os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "timerfd_create failed")
        self._fd = fd
        self._loop = loop
        self._callback = callback
        self._spec = _ITimerSpec()  # reused: arming allocates nothing
        loop.add_reader(fd, self._fire)

    def arm(self, when: float) -> None:
        when = max(when, 1e-9)  # an all-zero time would disarm the timer instead of firing it
        sec = int(when)
        self._spec.it_value.tv_sec = sec
        self._spec.it_value.tv_nsec = int((when - sec) * 1e9)
        if self._libc.timerfd_settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(self._spec), None) != 0:
            raise OSError(ctypes.get_errno(), "timerfd_settime failed")

    def _fire(self) -> None:
        try:
            os.read(self._fd, 8)
        except BlockingIOError:  # re-armed after it became readable: the new time has not come yet
            return
        self._callback()

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        os.close(self._fd)


class LoopClock:
    """Fallback on the event loop's timers (millisecond granularity, so sends may be ~1 ms late)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | asyncio.Handle | None = None

    def arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        delay = when - time.monotonic()
        # uvloop rounds delays to whole milliseconds; a sub-millisecond wait would become a busy loop.
        self._handle = self._loop.call_later(max(delay, 0.001), self._callback) if delay > 0 else None
        if self._handle is None:
            self._handle = self._loop.call_soon(self._callback)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()


class _TimeSpec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _ITimerSpec(ctypes.Structure):
    _fields_ = [("it_interval", _TimeSpec), ("it_value", _TimeSpec)]


_CLOCK_MONOTONIC: Final = 1
_TFD_TIMER_ABSTIME: Final = 1


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def make_clock(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> Clock:
    # The timerfd is armed with time.monotonic() values, so it must be the same clock.
    if sys.platform == "linux" and time.get_clock_info("monotonic").implementation.endswith("(CLOCK_MONOTONIC)"):
        try:
            return _TimerfdClock(loop, callback)
        except (OSError, AttributeError, NotImplementedError):
            pass  # no timerfd (old kernel, seccomp) or a loop without add_reader
    return LoopClock(loop, callback)
