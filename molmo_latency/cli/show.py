"""Moved to :mod:`molmo_latency.show` (the show layer): this name stays only while other branches
still import it; new code imports ``molmo_latency.show``."""

from molmo_latency.show import (console, err_console, format_cell, frame_records, print_frame, print_json,  # noqa: F401
                                set_wide, set_width)
