"""Acquisition sites of the synthetic generators: site "a" is bit-identical to the generator the demo models were
trained on (checksums taken before sites existed), site "b" is a different scanner/clinic with its own group shares."""
from __future__ import annotations

import csv
import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from napari_dmoe.synthetic import (
    FUNDUS_SITES,
    PROSTATE_SITES,
    SyntheticDataError,
    make_fundus,
    make_prostate,
    write_fairseg,
    write_prostate,
)

REPO = Path(__file__).resolve().parents[1]

# sha256 of image + mask + race + attributes, computed with the generators as they were before `site` was added
FUNDUS_A = {
    0: "982aae3b95a5bf58a801ac6d2bcab1f1fede7074d8bc60d4263487ed8c728767",
    1: "80b3bdda811ef126d1841e4f191c88ecc5282943b4d2a4cbe586d80ab0ac7c70",
    2: "1386b9cc48ad62f62c3c7642528193d7400a191d07eb74e150f8f74603786f32",
}
PROSTATE_A0 = "75a409fbb2c5d69f014ce97625ac310eb563004a71ba09c407c4c4aa2cae8d7f"


def _fundus_hash(s) -> str:
    return hashlib.sha256(s.image.tobytes() + s.mask.tobytes() + s.race.encode()
                          + json.dumps(s.attributes).encode()).hexdigest()


def test_site_a_is_the_unchanged_generator() -> None:
    for i, digest in FUNDUS_A.items():
        assert _fundus_hash(make_fundus(0, size=64, index=i)) == digest
        assert _fundus_hash(make_fundus(0, size=64, index=i, site="a")) == digest
    c = make_prostate(0, shape=(32, 32, 16), spacing=(3, 3, 3), index=0)
    assert hashlib.sha256(c.image.tobytes() + c.label.tobytes() + c.stage.encode()).hexdigest() == PROSTATE_A0


def test_site_b_looks_different_and_keeps_the_labelling() -> None:
    a = [make_fundus(4, race="White", size=96, index=i) for i in range(12)]
    b = [make_fundus(4, race="White", size=96, index=i, site="b") for i in range(12)]
    assert not np.array_equal(a[0].image, b[0].image)
    # darker, lower contrast (within-image spread), wider field of view (smaller labelled disc)
    assert np.mean([s.image.mean() for s in b]) < np.mean([s.image.mean() for s in a]) - 5
    disc = lambda ss: np.mean([(s.mask != 0).sum() for s in ss])  # noqa: E731
    assert disc(b) < 0.85 * disc(a)
    # same convention: annotated cup-to-disc area ratio per group close at both sites
    for race in ("White", "Black"):
        ratio = {site: np.mean([(s.mask == -2).sum() / (s.mask != 0).sum()
                                for s in (make_fundus(5, race=race, size=96, index=i, site=site) for i in range(16))])
                 for site in "ab"}
        assert abs(ratio["a"] - ratio["b"]) < 0.06, (race, ratio)
    pa = make_prostate(2, "T3", shape=(32, 32, 16), spacing=(3, 3, 3))
    pb = make_prostate(2, "T3", shape=(32, 32, 16), spacing=(3, 3, 3), site="b")
    assert not np.array_equal(pa.image, pb.image)
    with pytest.raises(SyntheticDataError, match="site 'z'"):
        make_fundus(0, size=64, site="z")


def test_site_c_black_eyes_are_drawn_and_labelled_like_site_a_white_eyes() -> None:
    """Site "c" (issue 25): its Black patients resemble site A's White ones (cup-to-disc area ratio), the other
    groups keep their own; the images are another stream than sites a and b."""
    ratio = lambda race, site: np.mean([(s.mask == -2).sum() / (s.mask != 0).sum()  # noqa: E731
                                        for s in (make_fundus(6, race=race, size=96, index=i, site=site)
                                                  for i in range(16))])
    assert abs(ratio("Black", "c") - ratio("White", "a")) < 0.04
    assert ratio("Black", "a") > ratio("Black", "c") + 0.08
    assert abs(ratio("Asian", "c") - ratio("Asian", "a")) < 0.06
    assert not np.array_equal(make_fundus(0, size=64, site="c").image, make_fundus(0, size=64, site="b").image)


def test_site_b_writers_have_the_stated_group_shares(tmp_path: Path) -> None:
    root = write_fairseg(tmp_path / "fairseg", n_train=40, n_test=20, seed=1, size=48, site="b")
    races = [int(np.load(root / n)["race"]) for n in (root / "test.txt").read_text().split()]
    shares = FUNDUS_SITES["b"]["frequencies"]
    counts = Counter(("Asian", "Black", "White")[r] for r in races)
    assert counts == {g: round(20 * f) for g, f in shares.items()}
    root = write_prostate(tmp_path / "prostate", n=20, seed=1, shape=(24, 24, 12), spacing=(4, 4, 4), site="b")
    with open(root / "attributes.csv") as fh:
        stages = Counter(row["stage"] for row in csv.DictReader(fh))
    assert stages == {g: round(20 * f) for g, f in PROSTATE_SITES["b"]["frequencies"].items() if f}


def test_generate_script_site_option(tmp_path: Path) -> None:
    run = lambda *a: subprocess.run([sys.executable, str(REPO / "sample_data/generate.py"), *a],  # noqa: E731
                                    capture_output=True, text=True, timeout=120)
    res = run("fundus", "--out", str(tmp_path), "--n", "10", "--n-test", "10", "--size", "48", "--site", "b")
    assert res.returncode == 0, res.stderr
    assert json.loads((tmp_path / "fairseg" / "provenance.json").read_text())["site"] == "b"
    res = run("skin", "--out", str(tmp_path), "--n", "4", "--site", "b")
    assert res.returncode == 2 and "skin has only site 'a'" in res.stderr
    # each kind its own sites: fundus has the test site D, prostate does not, and says which it has
    res = run("fundus", "--out", str(tmp_path / "d"), "--n", "0", "--n-test", "3", "--size", "48", "--site", "d")
    assert res.returncode == 0, res.stderr
    assert len(list((tmp_path / "d" / "fairseg").glob("*.npz"))) == 3
    res = run("prostate", "--out", str(tmp_path / "p"), "--n", "2", "--size", "24x24x8", "--site", "d")
    assert res.returncode == 2 and "site 'd' is not one of ['a', 'b', 'c']" in res.stderr
    assert not (tmp_path / "p" / "prostate").exists() or not any((tmp_path / "p" / "prostate").rglob("*.nii.gz"))


def test_prostate_site_c_records_t1_for_t3_disease() -> None:
    """Site "c" (issue 25): a patient recorded T1 there has T3 anatomy and target; site a's T1 is the gland only."""
    volume = lambda stage, site: np.mean([make_prostate(7, stage, shape=(48, 48, 24), spacing=(3, 3, 3), index=i,  # noqa: E731
                                                        site=site).label.sum() for i in range(4)])
    t1_c = make_prostate(7, "T1", shape=(48, 48, 24), spacing=(3, 3, 3), site="c")
    assert t1_c.stage == "T1"  # recorded as the site records it
    assert volume("T1", "c") > 1.5 * volume("T1", "a")
    assert abs(volume("T1", "c") - volume("T3", "c")) < 0.3 * volume("T3", "c")
