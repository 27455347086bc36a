"""edgexfer: transfer-learned image and text classifiers for edge devices that keep learning in the field.

This module stays light (no torch, no engines): it is imported before ``edgexfer.runtime`` on devices.
"""
from __future__ import annotations

__version__ = "0.1.0"
