"""Put a device's wall clock EDGEXFER_TEST_CLOCK_OFFSET_S seconds off, for the fleet tests.

A Jetson without an RTC battery boots with a wrong clock until NTP answers. The fleet test starts one
SuperNode with this directory on PYTHONPATH, so that process and the ClientApp processes it starts read
a wall clock that is off by the offset: ``time.time`` and ``datetime.now``/``utcnow``, which is where
Flower's message timestamps and lifetimes come from. (libfaketime cannot be used: under it the
SuperNode never connects, even with a zero offset.) Monotonic clocks are left alone, as on a device.
"""
import datetime as _datetime
import os
import time as _time

_OFFSET = float(os.environ.get("EDGEXFER_TEST_CLOCK_OFFSET_S", "0"))

if _OFFSET:
    _real_time, _real_time_ns = _time.time, _time.time_ns
    _time.time = lambda: _real_time() + _OFFSET
    _time.time_ns = lambda: _real_time_ns() + int(_OFFSET * 1e9)

    class _WrongClockDatetime(_datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return super().now(tz) + _datetime.timedelta(seconds=_OFFSET)

        @classmethod
        def utcnow(cls):
            return super().utcnow() + _datetime.timedelta(seconds=_OFFSET)

    _datetime.datetime = _WrongClockDatetime
