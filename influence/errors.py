"""One exception type for every mistake the engine can explain to its user in a sentence."""


class InfluenceError(Exception):
    """Bad input or state: the message says what is wrong and what to do."""
