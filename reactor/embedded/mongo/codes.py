"""MongoDB's error shape: a code, its name, a message and labels, as command handlers raise it."""

from __future__ import annotations

from typing import Any


class CommandError(Exception):
    """Raised by a command handler to answer with MongoDB's error shape."""

    def __init__(
        self, code: int, message: str, code_name: str | None = None, labels: list[str] | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.code_name = code_name or CODE_NAMES.get(code, "UnknownError")
        self.labels = labels or []
        self.extra: dict[str, Any] = {}  # more fields of the reply (keyPattern, keyValue…)
        self.before_command = False  # raised by failCommand, before the command ran
        self.labels_given = False  # the fail point named the labels ([] included): add none


CODE_NAMES = {
    1: "InternalError",
    2: "BadValue",
    6: "HostUnreachable",
    7: "HostNotFound",
    9: "FailedToParse",
    11: "UserNotFound",
    14: "TypeMismatch",
    20: "IllegalOperation",
    26: "NamespaceNotFound",
    28: "PathNotViable",
    40: "ConflictingUpdateOperators",
    43: "CursorNotFound",
    48: "NamespaceExists",
    52: "DollarPrefixedFieldName",
    56: "EmptyFieldName",
    59: "CommandNotFound",
    66: "ImmutableField",
    72: "InvalidOptions",
    85: "IndexOptionsConflict",
    89: "NetworkTimeout",
    91: "ShutdownInProgress",
    115: "CommandNotSupported",
    121: "DocumentValidationFailure",
    133: "FailedToSatisfyReadPreference",
    150: "StaleEpoch",
    189: "PrimarySteppedDown",
    234: "RetryChangeStream",
    260: "InvalidResumeToken",
    262: "ExceededTimeLimit",
    280: "ChangeStreamFatalError",
    286: "ChangeStreamHistoryLost",
    9001: "SocketException",
    10107: "NotWritablePrimary",
    11000: "DuplicateKey",
    11600: "InterruptedAtShutdown",
    11602: "InterruptedDueToReplStateChange",
    13388: "StaleConfig",
    13435: "NotPrimaryNoSecondaryOk",
    13436: "NotPrimaryOrSecondary",
    40324: "Location40324",
    63: "StaleShardVersion",
    50: "MaxTimeMSExpired",
}
