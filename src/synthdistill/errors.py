"""The one exception users see: a sentence that says what to do, never a stack trace.

A hint that names a setting or a pipeline argument is written with :func:`setting` or
:func:`argument`, so it can be rendered for whoever has to act on it: ``--set prompts.llm=PATH``
under ``synthdistill run``, ``--llm PATH`` under ``synthdistill prompts``, and the recipe key or the
keyword argument (``force=True``) in the Python API, which is what ``str(error)`` gives.
"""

from __future__ import annotations

import re
from collections.abc import Callable

_MARK = re.compile(r"\[\[(set|arg):([^\]|]*)\|([^\]]*)\]\]")


def setting(key: str, value: str = "PATH") -> str:
    """A hint to set recipe ``key`` to ``value``, rendered for the command that failed."""
    return f"[[set:{key}|{value}]]"


def argument(flag: str, keyword: str) -> str:
    """A hint naming a pipeline argument: ``flag`` on the command line, ``keyword`` in the API."""
    return f"[[arg:{flag}|{keyword}]]"


def api_style(kind: str, name: str, value: str) -> str:
    """The Python API's wording: ``prompts.llm=PATH`` (a recipe key) or ``force=True``."""
    return f"{name}={value}" if kind == "set" else value


Style = Callable[[str, str, str], str]


class SynthdistillError(Exception):
    """A problem with the user's input or environment, explained in one sentence.

    The CLI prints it as ``error: <message>`` (hints rendered for its command, :meth:`render`) and
    exits with status 2; anything else that escapes is a bug and keeps its traceback.
    """

    def render(self, style: Style = api_style) -> str:
        """The message with each :func:`setting` / :func:`argument` hint written by ``style``."""
        text = str(self.args[0]) if self.args else ""
        return _MARK.sub(lambda m: style(m[1], m[2], m[3]), text)

    def __str__(self) -> str:
        return self.render()
