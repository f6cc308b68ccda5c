"""The kflats command line."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import kflats
from kflats import KSubspaces
from kflats.__main__ import main
from kflats.cli import _arrays, fit
from kflats.cli._common import write_file_atomically


@pytest.fixture
def A():
    rng = np.random.RandomState(0)
    lines = np.linalg.qr(rng.randn(6, 2))[0].T
    return np.vstack(
        [np.outer(rng.randn(30), lines[0]), np.outer(rng.randn(30), lines[1])]
    )


@pytest.fixture
def matrix_file(A, tmp_path):
    path = tmp_path / "A.npy"
    np.save(path, A)
    return path


def one_line(err):
    """The single line a user's mistake prints on stderr, checked as such."""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err.rstrip("\n")


# --- the skeleton: --version, --help, errors -------------------------------


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"kflats {kflats.__version__}\n"


def test_help_still_works(capsys):
    assert main(["factorize", "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: kflats factorize")
    assert "--out PATH, --output PATH" in out and "FILE.npz:KEY" in out


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["factorize", "--budget", "1.5"],
            "kflats factorize: error: argument --budget: expected a fraction in "
            "(0, 1], got 1.5",
        ),
        (
            ["factorize", "--budget", "half"],
            "kflats factorize: error: argument --budget: expected a fraction in "
            "(0, 1], got half",
        ),
        (
            ["fit", "--k", "0"],
            "kflats fit: error: argument --k: expected an integer >= 1, got 0",
        ),
        (
            ["fit", "--ranks", "uniform"],
            "kflats: error: unrecognized arguments: --ranks uniform",
        ),
        ([], "kflats: error: the following arguments are required: command"),
    ],
)
def test_usage_error_is_one_line(argv, expected, capsys):
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert one_line(captured.err) == expected
    assert captured.out == ""


@pytest.mark.parametrize("budget", ["0", "1.5", "-0.2"])
def test_factorize_rejects_bad_budget(matrix_file, budget, capsys):
    argv = ["factorize", "--matrix", str(matrix_file), "--budget", budget]
    assert main(argv) == 2
    assert "expected a fraction in (0, 1]" in one_line(capsys.readouterr().err)


@pytest.mark.parametrize(
    "exc, expected",
    [
        (ValueError("bad\n  value"), "kflats: bad value"),
        (FileNotFoundError(2, "No such file or directory", "x.pt"),
         "kflats: No such file or directory: 'x.pt'"),
        (PermissionError("cannot write 'y.npz': Permission denied"),
         "kflats: cannot write 'y.npz': Permission denied"),
        (ModuleNotFoundError("No module named 'torch'", name="torch"),
         "kflats: No module named 'torch' (pip install 'kflats[torch]')"),
        (ImportError("needs x: pip install 'kflats[nlp]'."),
         "kflats: needs x: pip install 'kflats[nlp]'."),
    ],
)  # fmt: skip
def test_command_errors_are_one_line(exc, expected, matrix_file, monkeypatch, capsys):
    def fail(args):
        raise exc

    monkeypatch.setattr(fit, "run", fail)
    assert main(["fit", "--matrix", str(matrix_file)]) == 2
    assert one_line(capsys.readouterr().err) == expected


def test_interrupt_exits_130(monkeypatch, capsys):
    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(fit, "run", interrupted)
    assert main(["fit"]) == 130
    assert one_line(capsys.readouterr().err) == "kflats: interrupted"


def test_a_bug_keeps_its_traceback(monkeypatch):
    def buggy(args):
        raise TypeError("a bug")

    monkeypatch.setattr(fit, "run", buggy)
    with pytest.raises(TypeError, match="a bug"):
        main(["fit"])


# --- --matrix --------------------------------------------------------------


def test_fit_reports_the_cost(matrix_file, capsys):
    assert main(["fit", "--matrix", str(matrix_file), "--k", "2", "--j", "1"]) == 0
    out = capsys.readouterr().out
    assert "60 x 6" in out
    assert "rows per subspace: [30, 30]" in out
    assert "relative cost inertia / ||A||^2: 0.0000" in out
    assert "truncated SVD with as many parameters (rank 2)" in out


def test_fit_rejects_bad_parameters(matrix_file, capsys):
    assert main(["fit", "--matrix", str(matrix_file), "--k", "1", "--j", "6"]) == 2
    err = one_line(capsys.readouterr().err)
    assert "j=6 must be smaller than n_features=6" in err


def _save_csv(path, A, header=None):
    with open(path, "w") as f:
        if header:
            f.write(header + "\n")
        np.savetxt(f, A, delimiter=",", fmt="%.17g")


@pytest.mark.parametrize(
    "name, write",
    [
        ("A.npy", lambda path, A: np.save(path, A)),
        ("A.npz", lambda path, A: np.savez(path, weight=A)),
        ("A.npz:weight", lambda path, A: np.savez(path, weight=A, bias=A[0])),
        ("A.csv", _save_csv),
        ("A.csv", lambda path, A: _save_csv(path, A, "x0,x1,x2,x3,x4,x5")),
    ],
)
def test_matrix_formats(name, write, A, tmp_path):
    source = str(tmp_path / name)
    write(source.partition(":")[0], A)
    B, shown = _arrays.load_matrix(source)
    assert shown == source
    np.testing.assert_array_equal(B, A)


def test_integer_matrix_becomes_float(A, tmp_path):
    np.save(tmp_path / "A.npy", A > 0)
    B, _ = _arrays.load_matrix(str(tmp_path / "A.npy"))
    assert B.dtype == np.float64
    np.testing.assert_array_equal(B, A > 0)


def test_fit_reads_csv(A, tmp_path, capsys):
    path = tmp_path / "A.csv"
    _save_csv(path, A, "a,b,c,d,e,f")
    assert main(["fit", "--matrix", str(path), "--k", "2", "--j", "1"]) == 0
    out = capsys.readouterr().out
    assert "60 x 6, float64" in out and "rows per subspace: [30, 30]" in out


def _text(content):
    return lambda path: Path(path).write_text(content)


def _npy(array):
    return lambda path: np.save(path, array)


def _truncated(path):
    np.save(path, np.ones((100, 100)))
    with open(path, "r+b") as f:
        f.truncate(500)


BAD_MATRICES = [
    ("A.txt", _text("1,2\n3,4\n"), "--matrix must be 'minilm' or a .npy, .npz or "
     ".csv file, got '{path}'"),
    ("A", _text(""), "--matrix must be 'minilm' or a .npy, .npz or .csv file, "
     "got '{path}'"),
    ("missing.npy", None, "cannot read --matrix '{path}': No such file or "
     "directory"),
    ("folder.npy", os.mkdir, "cannot read --matrix '{path}': Is a directory"),
    ("A.npy", _text("1,2\n"), "--matrix '{path}' is not a NumPy .npy or .npz "
     "file"),
    ("A.npy", _truncated, "cannot read --matrix '{path}': its header announces "
     "shape (100, 100)"),
    ("A.npy", _npy(np.ones(3)), "--matrix '{path}' must be a 2-D array, got "
     "shape (3,)"),
    ("A.npy", _npy(np.ones((2, 3, 4))), "--matrix '{path}' must be a 2-D array, "
     "got shape (2, 3, 4)"),
    ("A.npy", _npy(np.ones((0, 3))), "--matrix '{path}' is empty: shape (0, 3)"),
    ("A.npy", _npy(np.array([["a", "b"]])), "--matrix '{path}' must hold real "
     "numbers, got dtype <U1"),
    ("A.npy", _npy(np.ones((2, 2), complex)), "--matrix '{path}' must hold real "
     "numbers, got complex numbers"),
    ("A.npy", _npy(np.array([[1, None]], dtype=object)), "cannot read --matrix "
     "'{path}': dtype object is not accepted"),
    ("A.npy", _npy(np.array([[np.nan, 1, np.inf], [np.nan, -np.inf, 0]])),
     "--matrix '{path}' holds 2 NaN and 2 infinite values (of 2 x 3): remove or "
     "replace them first"),
    ("A.npz", lambda path: np.savez(path, weight=np.ones((2, 2)), bias=np.ones(2)),
     "--matrix '{path}' holds 2 arrays (weight, bias): pick one with --matrix "
     "{path}:KEY"),
    ("A.npz:b", lambda path: np.savez(path, a=np.ones((2, 2))),
     "--matrix '{path}' has no array 'b'; it holds a"),
    ("A.npz", _text("PK\x03\x04 not really"), "--matrix '{path}' is not an .npz "
     "archive: not a readable zip archive (File is not a zip file)"),
    ("A.npy:a", _npy(np.ones((2, 2))), "--matrix '{path}:a': only a .npz file has "
     "arrays by name"),
    ("A.csv", _text(""), "--matrix '{path}' is empty: shape (0, 1)"),
    ("A.csv", _text("1,2,3\n4,x,6\n"), "--matrix '{path}' line 2, column 2: 'x' "
     "is not a number"),
    ("A.csv", _text("a,b\n1,2\n\n3,\n"), "--matrix '{path}' line 4, column 2: '' "
     "is not a number"),
    ("A.csv", _text("1,2,3\n4,5\n"), "--matrix '{path}' line 2 has 2 values, the "
     "lines before it 3"),
    ("A.csv", _text("1,nan\ninf,2\n"), "--matrix '{path}' holds 1 NaN and 1 "
     "infinite values (of 2 x 2): remove or replace them first"),
    ("A.csv", lambda path: Path(path).write_bytes(b"\x93\xff\x00"),
     "--matrix '{path}' is not a text file"),
]  # fmt: skip


@pytest.mark.parametrize("command", ["fit", "factorize"])
@pytest.mark.parametrize("name, make, expected", BAD_MATRICES)
def test_bad_matrix_is_one_line(command, name, make, expected, tmp_path, capsys):
    source = str(tmp_path / name)
    path = source.rpartition(":")[0] if ":" in name else source
    if make is not None:
        make(path)
    assert main([command, "--matrix", source]) == 2
    captured = capsys.readouterr()
    assert one_line(captured.err).startswith("kflats: " + expected.format(path=path))
    assert captured.out == ""


# --- --out -----------------------------------------------------------------


@pytest.mark.parametrize("affine", [False, True])
def test_fit_saves_the_model(affine, A, matrix_file, tmp_path, capsys):
    argv = ["fit", "--matrix", str(matrix_file), "--k", "2", "--j", "1"]
    argv += ["--affine"] * affine
    assert main([*argv, "--out", str(tmp_path / "model")]) == 0
    path = tmp_path / "model.npz"
    assert capsys.readouterr().out.endswith(f"model saved to {path}\n")
    ks = KSubspaces(k=2, j=1, affine=affine, random_state=0).fit(A)
    with np.load(path, allow_pickle=False) as saved:
        assert sorted(saved.files) == sorted(
            ["labels_", "bases_", "inertia_", "k", "j", "affine"] + ["means_"] * affine
        )
        np.testing.assert_array_equal(saved["labels_"], ks.labels_)
        np.testing.assert_array_equal(saved["bases_"], ks.bases_)
        if affine:
            np.testing.assert_array_equal(saved["means_"], ks.means_)
        assert saved["inertia_"] == ks.inertia_
        assert (saved["k"], saved["j"], saved["affine"]) == (2, 1, affine)
    assert sorted(os.listdir(tmp_path)) == ["A.npy", "model.npz"]  # no temp left


@pytest.mark.parametrize("option", ["--out", "--output"])
def test_factorize_saves_factors(option, A, matrix_file, tmp_path, capsys):
    from kflats.factorize import ProjectiveFactors

    out = tmp_path / "f.npz"
    argv = ["factorize", "--matrix", str(matrix_file), "--budget", "0.7"]
    assert main([*argv, "--k", "1", "2", option, str(out)]) == 0
    text = capsys.readouterr().out
    assert "truncated SVD (rank" in text and "kflats (adaptive ranks" in text
    assert text.endswith(f"factors saved to {out}\n")
    factors = ProjectiveFactors.load(out)
    assert factors.shape == (60, 6) and factors.compression <= 0.7
    exact = ((A - factors.reconstruct()) ** 2).sum() / (A**2).sum()
    assert factors.error == pytest.approx(exact, abs=1e-9)
    assert f"relative error {factors.error:.4f}" in text
    assert sorted(os.listdir(tmp_path)) == ["A.npy", "f.npz"]


@pytest.mark.parametrize("command", ["fit", "factorize"])
def test_out_refuses_to_overwrite(command, matrix_file, tmp_path, capsys):
    out = tmp_path / "result.npz"
    out.write_bytes(b"precious")
    argv = [command, "--matrix", str(matrix_file), "--k", "2", "--out", str(out)]
    argv += ["--j", "1"] if command == "fit" else []
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert one_line(captured.err) == (
        f"kflats: '{out}' exists; pass --overwrite to replace it"
    )
    assert captured.out == ""  # refused before any work
    assert out.read_bytes() == b"precious"
    assert main([*argv, "--overwrite"]) == 0
    with np.load(out, allow_pickle=False) as saved:
        assert "k" in saved.files


def test_out_into_a_missing_folder(matrix_file, tmp_path, capsys):
    out = tmp_path / "no" / "x.npz"
    assert main(["fit", "--matrix", str(matrix_file), "--out", str(out)]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"kflats: cannot write '{out}': no folder '{out.parent}'"
    )


def test_write_atomically_leaves_the_target_whole(tmp_path):
    target = tmp_path / "x.npz"
    target.write_bytes(b"old")

    def half_then_fail(f):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="cannot write .* No space left on device"):
        write_file_atomically(str(target), half_then_fail, overwrite=True)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.npz"]
    write_file_atomically(str(target), lambda f: f.write(b"new"), overwrite=True)
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["x.npz"]
    with pytest.raises(FileExistsError, match="pass --overwrite"):
        write_file_atomically(str(target), lambda f: f.write(b"x"), overwrite=False)
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["x.npz"]


# --- through the installed command -----------------------------------------


def test_python_m_kflats_version(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "kflats", "--version"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout == f"kflats {kflats.__version__}\n"


def test_entry_point_bad_input_has_no_traceback(tmp_path):
    script = os.path.join(os.path.dirname(sys.executable), "kflats")
    if not os.path.exists(script):
        pytest.skip("the kflats entry point is not installed")
    np.save(tmp_path / "v.npy", np.ones(3))
    done = subprocess.run(
        [script, "fit", "--matrix", "v.npy"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert one_line(done.stderr) == (
        "kflats: --matrix 'v.npy' must be a 2-D array, got shape (3,)"
    )
