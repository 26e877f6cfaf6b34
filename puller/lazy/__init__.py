"""Lazy pull: a content-aware index of an image, pushed as an OCI artifact beside it, and a
FUSE file system that serves the image's rootfs from that index, fetching verified chunks on
demand.  See format.py for the artifact's layout and the README-style notes in convert.py."""
