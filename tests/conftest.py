"""Shared fixtures: small generated BreakHis-shaped trees (real naming, synthetic pixels)."""
import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# the secret key that seals trusted files (breakhis/seal.py): a private one, never the user's own
os.environ.setdefault("BREAKHIS_SECRET", str(Path(tempfile.mkdtemp(prefix="breakhis-key-")) / "secret.key"))


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
    """A 16-patient, 12-images-per-patient synthetic tree at 96x64 px (shared; do not modify)."""
    from breakhis.data.demo import make_demo

    return make_demo(tmp_path_factory.mktemp("demo"), patients=16, images_per_patient=12, size=(96, 64))


@pytest.fixture
def fresh_demo(tmp_path):
    """A private small tree a test may modify."""
    from breakhis.data.demo import make_demo

    return make_demo(tmp_path, patients=8, images_per_patient=8, size=(96, 64))


@pytest.fixture
def cache_dir(tmp_path):
    d = tmp_path / "cache"
    d.mkdir()
    return d


@pytest.fixture(scope="session")
def he_picture():
    """The real H&E field ../shared/data/he-field.png (RGB PIL image); the test is skipped when it is absent
    (it is never downloaded: /work/shared/data/README.md says where it comes from)."""
    from breakhis.data.demo import HE_FIELD, he_source

    if not HE_FIELD.is_file():
        pytest.skip(f"the real H&E field {HE_FIELD} is absent (tests on real histology need it; never downloaded)")
    return he_source(HE_FIELD)
