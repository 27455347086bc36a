"""Inference engine backends, one file each; see :mod:`edgexfer.runtime.backends.base`."""
