import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from unpack_helpers import describe  # noqa: E402

_HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="unpacking a rootfs needs root (chown, mknod, trusted xattrs)")
    for item in items:
        if str(item.fspath).startswith(_HERE):
            item.add_marker(skip)


class Arena:
    """A temp dir with `dest/` to unpack into and `outside/` that must never change."""

    def __init__(self, base):
        self.base = str(base)
        self.dest = os.path.join(self.base, "dest")
        self.outside = os.path.join(self.base, "outside")
        os.mkdir(self.dest)
        os.makedirs(os.path.join(self.outside, "dir"))
        with open(os.path.join(self.outside, "secret"), "w") as f:
            f.write("secret\n")
        os.chmod(os.path.join(self.outside, "secret"), 0o640)
        os.utime(os.path.join(self.outside, "dir"), (1_000_000, 1_000_000))
        self._before = describe(self.outside)
        self._names = sorted(os.listdir(self.base))

    def assert_outside_untouched(self):
        assert describe(self.outside) == self._before
        assert sorted(os.listdir(self.base)) == self._names


@pytest.fixture
def arena(tmp_path):
    a = Arena(tmp_path)
    yield a
    a.assert_outside_untouched()
