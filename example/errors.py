"""The example's error: a problem the user can fix, printed by run_cli as one line with exit status 2."""


class PipelineError(Exception):
    """A problem the user can fix (missing data, bad flag, missing checkpoint); printed as one line by run_cli."""
