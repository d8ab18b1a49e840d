"""Here so that pytest puts the repository root on the import path (a rootdir conftest, in the default "prepend"
import mode): the tests import the scripts' modules (`import pipeline`, `from example...`), the engine and their own
helpers (`from tests.helpers import run`) from the root, however pytest is started. The fixtures are in
tests/conftest.py."""
