"""The documentation: its commands parse, its links resolve, its lists match the code."""
