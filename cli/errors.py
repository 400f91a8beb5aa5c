"""The one map from errors to what the command line prints and returns.

A user's mistake (a bad option, file, name or value) or a refusal of the system prints one line
``twinloop COMMAND: error: MESSAGE`` on stderr and exits with :data:`EXIT_USAGE`; never a
traceback. A verdict is not an error: commands return their own exit codes for those.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from twinloop.extras import MissingExtraError

#: Exit code of a refused command (bad input, missing file, a refusal of the system).
EXIT_USAGE = 2
#: Exit code after Ctrl-C.
EXIT_INTERRUPTED = 130


def user_errors() -> tuple[type[BaseException], ...]:
    """The exception types a command reports as one line (every package's error base)."""
    from twinloop.agents.errors import AgentError
    from twinloop.extras import MissingExtraError
    from twinloop.hw_bridge.errors import BridgeError
    from twinloop.plant.errors import PlantError
    from twinloop.policies.errors import PolicyError
    from twinloop.therapy import TherapyError

    # Every package's errors subclass ValueError, OSError, KeyError or RuntimeError besides their
    # base; ValueError and OSError also cover file and number mistakes (ssl.SSLError included).
    return (
        PlantError,
        AgentError,
        PolicyError,
        BridgeError,
        TherapyError,
        MissingExtraError,
        ValueError,
        OSError,
        KeyError,
    )


def missing_extra(exc: ModuleNotFoundError) -> MissingExtraError | None:
    """The extra that would have installed the module ``exc`` did not find, if it is one's."""
    from twinloop.extras import EXTRAS, MissingExtraError

    top = (exc.name or "").split(".")[0]
    for extra, modules in EXTRAS.items():
        if top in modules:
            return MissingExtraError(f"this command ({top} is not installed)", extra)
    return None


def message(exc: BaseException) -> str:
    """The first line of an error's message (a KeyError's text without its quotes)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    return (text.strip().splitlines() or [type(exc).__name__])[0]


def fail(command: str, exc: BaseException | str) -> int:
    """Print ``twinloop COMMAND: error: MESSAGE`` on stderr; return :data:`EXIT_USAGE`."""
    text = exc if isinstance(exc, str) else message(exc)
    print(f"twinloop {command}: error: {text}", file=sys.stderr)
    return EXIT_USAGE
