"""One exception base for the whole library, and the exit codes of every command."""

EXIT_OK = 0
EXIT_KO = 1            # at least one node ended KO
EXIT_USAGE = 2         # bad command line or bad input stream
EXIT_CONFIG = 3        # configuration, environment, database or missing feature
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as a shell reports a process killed by it
EXIT_INTERNAL = 70     # an unexpected error: a bug in kabin (rerun with --debug)


class KabinError(Exception):
    """Base of every error the library raises on purpose.

    The CLI turns it into ``prog: error: <message>`` and ``exit_code``.
    """

    exit_code = EXIT_USAGE


class UsageError(KabinError):
    """Bad arguments or bad input records."""

    exit_code = EXIT_USAGE


class InputError(UsageError):
    """A malformed line in the record stream."""

    def __init__(self, message, source="<stdin>", lineno=None):
        where = f"{source}:{lineno}" if lineno is not None else source
        super().__init__(f"{where}: {message}")


class ConfigError(KabinError):
    """An invalid or missing configuration file: names the file, the key and what is expected."""

    exit_code = EXIT_CONFIG

    def __init__(self, message, file=None, key=None):
        parts = [str(file) if file else None, f"key '{key}'" if key else None, message]
        super().__init__(": ".join(p for p in parts if p))
        self.file, self.key = file, key


class EnvironmentNotFound(KabinError):
    exit_code = EXIT_CONFIG


class RightsError(KabinError):
    """The requesting user may not act on some of the nodes: nothing was done."""

    exit_code = EXIT_CONFIG


class DatabaseError(KabinError):
    exit_code = EXIT_CONFIG


class SystemRequirementError(KabinError):
    """The machine lacks something (root, a package, a kernel feature)."""

    exit_code = EXIT_CONFIG


class Interrupted(KabinError):
    exit_code = EXIT_INTERRUPTED
