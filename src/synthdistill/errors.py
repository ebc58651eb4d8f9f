"""The one exception users see: a sentence that says what to do, never a stack trace."""


class SynthdistillError(Exception):
    """A problem with the user's input or environment, explained in one sentence.

    The CLI prints it as ``error: <message>`` and exits with status 2; anything else that
    escapes is a bug and keeps its traceback.
    """
