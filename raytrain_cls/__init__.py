"""raytrain-cls: timm's image-classification training recipe as a Ray Train service."""

import time as _time

__version__ = "0.1.0"
# The earliest wall-clock stamp this package takes in a process: for a command, right after the interpreter
# started (run.startup checks the OS's process-start figure against it).
IMPORTED_AT = _time.time()
