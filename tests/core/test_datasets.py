"""The bundled texts: splits that never overlap, each of the shape it says."""

import pytest

from kflats.datasets import load_sentences


def test_the_splits_never_overlap():
    calibration, heldout = load_sentences("calibration"), load_sentences("heldout")
    outside, varied = load_sentences("outside"), load_sentences("varied")
    every = load_sentences("all")
    assert (len(calibration), len(heldout), len(every)) == (1920, 480, 2400)
    assert (len(outside), len(varied)) == (290, 600)
    assert not set(calibration) & set(heldout)
    assert sorted(every) == sorted(calibration + heldout)
    assert not set(outside) & set(every) and not set(varied) & set(every + outside)
    for texts in (every, outside, varied):  # no text twice, none blank or padded
        assert len(set(texts)) == len(texts)
        assert all(t and t == t.strip() for t in texts)


def test_the_varied_texts_have_other_shapes_than_the_sentences():
    lengths = [len(t.split()) for t in load_sentences("varied")]
    sentences = [len(t.split()) for t in load_sentences("all")]
    # fragments of a few words and passages of 40 or more, which the
    # sentences (4 to 45 words, mostly 10-18) hardly hold
    assert sum(n <= 3 for n in lengths) >= 30 and sum(n >= 40 for n in lengths) >= 30
    assert sum(n <= 3 for n in sentences) < 5 and sum(n >= 40 for n in sentences) < 5


def test_an_unknown_split_is_refused():
    with pytest.raises(ValueError, match="split must be one of"):
        load_sentences("train")
