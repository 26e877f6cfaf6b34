import os
import tempfile

import pytest


@pytest.fixture
def sock_path():
    d = tempfile.mkdtemp(prefix="ttrpc-")
    yield os.path.join(d, "s.sock")
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    os.rmdir(d)
