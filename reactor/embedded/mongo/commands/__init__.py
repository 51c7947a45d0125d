"""The emulator's command handlers, one module per command family.

Each module holds a mixin whose `HANDLERS` maps command names to its handler methods;
`MongoEmulator` (server.py) inherits them all and dispatches by name. Every handler has the
signature `(request, connection, db) -> reply document` and raises `CommandError` for an error
reply; nothing else may escape one (the dispatcher turns anything else into InternalError).
"""

from .admin import AdminCommands
from .ddl import DdlCommands
from .reads import ReadCommands
from .writes import WriteCommands

__all__ = ["AdminCommands", "DdlCommands", "ReadCommands", "WriteCommands"]
