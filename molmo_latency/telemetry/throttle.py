"""NVML clocks-event ("throttle") reasons as plain constants: no NVML, no device code, so that
analysis (explain, counter tracks) and the device layer share one definition.

The bits are NVML's ABI (``nvml.h``, ``nvmlClocksEventReason*``; BoardLimit and Reliability only
under the older ``nvmlClocksThrottleReason*`` spelling); a test checks them against pynvml.

Example:
    >>> throttle_reason_names(0x20 | 0x1)
    ['GpuIdle', 'SwThermalSlowdown']
    >>> is_slowdown(0x1), is_slowdown(0x40)
    (False, True)
"""

from __future__ import annotations

#: (name, bit) of each clocks-event ("throttle") reason NVML reports, lowest bit first.
THROTTLE_REASONS: tuple[tuple[str, int], ...] = (
    ("GpuIdle", 0x1),
    ("ApplicationsClocksSetting", 0x2),
    ("SwPowerCap", 0x4),
    ("HwSlowdown", 0x8),
    ("SyncBoost", 0x10),
    ("SwThermalSlowdown", 0x20),
    ("HwThermalSlowdown", 0x40),
    ("HwPowerBrakeSlowdown", 0x80),
    ("DisplayClockSetting", 0x100),
    ("BoardLimit", 0x200),
    ("Reliability", 0x400),
)

#: Bits that mean the clocks were pulled down by power, heat or hardware protection: everything but
#: GpuIdle, ApplicationsClocksSetting (user-set clocks) and DisplayClockSetting.
SLOWDOWN_REASONS_MASK: int = sum(
    bit for name, bit in THROTTLE_REASONS
    if name not in ("GpuIdle", "ApplicationsClocksSetting", "DisplayClockSetting")
)


def throttle_reason_names(mask: int | None) -> list[str]:
    """Names of the clocks-event reasons set in an NVML bitmask, lowest bit first.

    Unknown bits are named ``Unknown(0x...)``; ``None`` (sensor missing) and 0 give ``[]``.

    >>> throttle_reason_names(0x4 | 0x10000)
    ['SwPowerCap', 'Unknown(0x10000)']
    """
    if not mask:
        return []
    mask = int(mask)
    names = [name for name, bit in THROTTLE_REASONS if mask & bit]
    rest = mask & ~sum(bit for _, bit in THROTTLE_REASONS)
    if rest:
        names.append(f"Unknown({rest:#x})")
    return names


def is_slowdown(mask: int | None) -> bool:
    """True when the bitmask holds a reason that slows the clocks (not idle/app/display clocks).

    >>> is_slowdown(0x1), is_slowdown(0x1 | 0x40), is_slowdown(None)
    (False, True, False)
    """
    return bool(mask) and bool(int(mask) & SLOWDOWN_REASONS_MASK)
