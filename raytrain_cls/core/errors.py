"""The one base class of every error a user's input can cause: a config, a data set, a checkpoint, a shard.

The commands catch UserError alone and print its message, one line, without a traceback; anything else that
escapes is a bug of this project and says so. Each subclass keeps its own standard base too (ConfigError is a
ValueError, DataError a RuntimeError), so code that catches those still does.
"""

from __future__ import annotations


class UserError(Exception):
    """Raised for input the user can fix; the message names what and how."""
