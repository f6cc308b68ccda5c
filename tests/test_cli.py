"""The kflats command line."""

import numpy as np
import pytest

from kflats.__main__ import main


@pytest.fixture
def matrix_file(tmp_path):
    rng = np.random.RandomState(0)
    lines = np.linalg.qr(rng.randn(6, 2))[0].T
    A = np.vstack(
        [np.outer(rng.randn(30), lines[0]), np.outer(rng.randn(30), lines[1])]
    )
    path = tmp_path / "A.npy"
    np.save(path, A)
    return path


def test_fit_reports_the_cost(matrix_file, capsys):
    assert main(["fit", "--matrix", str(matrix_file), "--k", "2", "--j", "1"]) == 0
    out = capsys.readouterr().out
    assert "60 x 6" in out
    assert "rows per subspace: [30, 30]" in out
    assert "relative cost inertia / ||A||^2: 0.0000" in out
    assert "truncated SVD with as many parameters (rank 2)" in out


def test_fit_rejects_bad_parameters(matrix_file, capsys):
    assert main(["fit", "--matrix", str(matrix_file), "--k", "1", "--j", "6"]) == 2
    assert "j=6 must be smaller than n_features=6" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", "--matrix", str(matrix_file), "--k", "0"])
    assert "expected an integer >= 1" in capsys.readouterr().err


def test_fit_rejects_bad_matrix(tmp_path):
    with pytest.raises(SystemExit, match="must be 'minilm' or a path to a .npy"):
        main(["fit", "--matrix", "A.csv"])
    np.save(tmp_path / "v.npy", np.ones(3))
    with pytest.raises(SystemExit, match="2-D array"):
        main(["fit", "--matrix", str(tmp_path / "v.npy")])
    with pytest.raises(SystemExit, match="cannot read"):
        main(["fit", "--matrix", str(tmp_path / "missing.npy")])


def test_factorize_saves_factors(matrix_file, tmp_path, capsys):
    from kflats.factorize import ProjectiveFactors

    out = tmp_path / "f.npz"
    argv = ["factorize", "--matrix", str(matrix_file), "--budget", "0.7"]
    assert main([*argv, "--k", "1", "2", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "truncated SVD (rank" in text and "kflats (adaptive ranks" in text
    factors = ProjectiveFactors.load(out)
    assert factors.shape == (60, 6) and factors.compression <= 0.7
    A = np.load(matrix_file)
    exact = ((A - factors.reconstruct()) ** 2).sum() / (A**2).sum()
    assert factors.error == pytest.approx(exact, abs=1e-9)
    assert f"relative error {factors.error:.4f}" in text


@pytest.mark.parametrize("budget", ["0", "1.5", "-0.2"])
def test_factorize_rejects_bad_budget(matrix_file, budget, capsys):
    with pytest.raises(SystemExit):
        main(["factorize", "--matrix", str(matrix_file), "--budget", budget])
    assert "expected a fraction in (0, 1]" in capsys.readouterr().err
