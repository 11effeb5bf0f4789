"""The edge of every command line: each failure becomes one line on stderr and an exit code.

Library code raises; nothing below the command lines exits. `UsageError` carries a message for the
user (what was wrong and what to do); ValueError, OSError and FloatingPointError are bad inputs or
a broken environment too. `run` turns each into `error: <message>` and exit code 2, Ctrl-C into
exit code 130, and `parser` makes argparse's own errors one line (exit code 2) as well:

    def main(argv=None):
        cli.exit_with(cli.run(_main, argv))        # _main(argv) does the work and may return a code
"""
import argparse
import sys


class UsageError(ValueError):
    """A bad input the user can fix; the message says how."""


def one_line(error) -> str:
    """An exception's message with its whitespace (newlines from nested errors) folded."""
    return " ".join(str(error).split()) or type(error).__name__


def parser(prog, description, **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser whose errors are one line ('PROG: error: ...; see --help'), exit code 2."""
    p = argparse.ArgumentParser(prog=prog, description=description, **kwargs)
    p.error = lambda message: p.exit(2, f"{p.prog}: error: {message}; see --help\n")   # no usage block
    return p


def run(work, *args, interrupted="interrupted", os_error_hint="", prefix="error") -> int:
    """work(*args) with every failure as one line on stderr: returns work's exit code (None: 0), 2 for
    an error, 130 for Ctrl-C. os_error_hint follows the message of an OSError that names a file (a full
    disk, a folder that became read-only), e.g. what the run folder still holds."""
    try:
        return work(*args) or 0
    except KeyboardInterrupt:
        print(interrupted, file=sys.stderr)
        return 130
    except OSError as e:
        if e.strerror and e.filename:                   # raised by the system: which file, and why
            hint = "" if isinstance(e, FileNotFoundError) else os_error_hint
            print(f"{prefix}: {e.strerror} ({e.filename}){hint}", file=sys.stderr)
        else:                                           # raised by us, the message complete
            print(f"{prefix}: {one_line(e)}", file=sys.stderr)
        return 2
    except (ValueError, FloatingPointError) as e:
        print(f"{prefix}: {one_line(e)}", file=sys.stderr)
        return 2


def exit_with(code: int):
    """Exit with `code` unless it is 0 (so a main called from Python returns normally)."""
    if code:
        sys.exit(code)
