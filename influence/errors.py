"""One exception type for every mistake the engine can explain to its user in a sentence."""


class InfluenceError(Exception):
    """Bad input or state: the message says what is wrong and what to do."""


def first_line(error: BaseException, typed: bool = False) -> str:
    """An unexpected error in one line, for a message of ours: the first line of its text (its type's name where
    it has none); with `typed`, led by its type's name ("OSError: ...")."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    if typed:
        return f"{type(error).__name__}: {line}" if line else type(error).__name__
    return line or type(error).__name__
