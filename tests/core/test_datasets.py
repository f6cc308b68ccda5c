"""The bundled texts: splits that never overlap, the varied texts calibrated on."""

import pytest

from kflats.datasets import load_sentences


def test_the_splits_never_overlap_and_the_varied_texts_calibrate():
    calibration, heldout = load_sentences("calibration"), load_sentences("heldout")
    outside, every = load_sentences("outside"), load_sentences("all")
    assert (len(calibration), len(heldout), len(outside)) == (2520, 480, 290)
    assert not set(calibration) & set(heldout)
    assert not set(outside) & set(every)
    assert sorted(every) == sorted(calibration + heldout)
    # no text twice, none blank or padded
    for texts in (every, outside):
        assert len(set(texts)) == len(texts)
        assert all(t and t == t.strip() for t in texts)
    # the 600 varied texts: other shapes than the sentences (fragments of a
    # few words and passages of 40 or more)
    varied = calibration[1920:]
    lengths = [len(t.split()) for t in varied]
    assert len(varied) == 600
    assert sum(n <= 5 for n in lengths) >= 40 and sum(n >= 40 for n in lengths) >= 30
    assert max(len(t.split()) for t in heldout) < 50


def test_an_unknown_split_is_refused():
    with pytest.raises(ValueError, match="split must be"):
        load_sentences("train")
