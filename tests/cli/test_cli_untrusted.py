"""The command line against hostile or mistaken input: one line, exit 2."""

import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

from kflats.__main__ import main
from kflats.cli._common import sigterm_raises, write_file_atomically


def one_line(err):
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    return err.rstrip("\n")


# --- --matrix: declared sizes checked before anything is allocated ---------------


def _npy_declaring(path, shape, data=b"\0" * 64, descr="<f8"):
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": descr, "fortran_order": False, "shape": shape}
        )
        f.write(data)


@pytest.mark.parametrize("command", ["fit", "factorize"])
@pytest.mark.parametrize("shape", [(2**40,), (2**20, 2**20), (2**62, 2)])
def test_npy_declaring_a_huge_shape_fails_fast(command, shape, tmp_path, capsys):
    path = tmp_path / "huge.npy"
    _npy_declaring(path, shape)
    assert path.stat().st_size < 250
    start = time.perf_counter()
    assert main([command, "--matrix", str(path)]) == 2
    assert time.perf_counter() - start < 1
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"kflats: cannot read --matrix '{path}': its header")
    assert f"announces shape {shape}" in err


def test_npz_member_declaring_a_huge_shape_fails_fast(tmp_path, capsys):
    import zipfile

    member = tmp_path / "w.npy"
    _npy_declaring(member, (2**20, 2**20))
    path = tmp_path / "A.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.write(member, "w.npy")
    assert main(["fit", "--matrix", str(path)]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"--matrix '{path}', member 'w': its header announces" in err


def test_object_npy_is_refused_from_its_header(tmp_path, capsys):
    path = tmp_path / "o.npy"
    _npy_declaring(path, (2, 2), data=b"not a pickle", descr="|O")
    assert main(["fit", "--matrix", str(path)]) == 2
    assert one_line(capsys.readouterr().err) == (
        f"kflats: cannot read --matrix '{path}': dtype object is not accepted (only "
        "plain boolean, number and string arrays; never pickled objects)"
    )


@pytest.mark.parametrize("command", ["fit", "factorize"])
def test_csv_of_values_that_overflow(command, tmp_path, capsys):
    path = tmp_path / "big.csv"
    rng = np.random.default_rng(0)
    A = rng.normal(size=(20, 4))
    A[:, 2] = 1e308 * np.sign(A[:, 2])
    np.savetxt(path, A, delimiter=",", fmt="%.17g")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not one overflow warning
        assert main([command, "--matrix", str(path)]) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"kflats: --matrix '{path}': its values overflow float64")
    assert "column 3" in err and "rescale" in err


@pytest.mark.parametrize("scale, fits", [(1e60, True), (1e77, False), (1e150, False)])
def test_large_values_fit_without_a_warning_or_are_refused(scale, fits, tmp_path):
    path = tmp_path / "big.npy"
    A = np.random.default_rng(0).normal(size=(30, 4)) * scale
    np.save(path, A)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        code = main(["fit", "--matrix", str(path), "--k", "2", "--j", "1"])
    assert code == (0 if fits else 2)


# --- --out of fit and factorize ---------------------------------------------------


def test_fit_overwrite_refuses_a_device_node(tmp_path, capsys):
    link = tmp_path / "null.npz"
    os.symlink(os.devnull, link)
    np.save(tmp_path / "A.npy", np.eye(4))
    argv = ["fit", "--matrix", str(tmp_path / "A.npy"), "--k", "1", "--j", "1"]
    assert main([*argv, "--out", str(link), "--overwrite"]) == 2
    assert "is not a regular file" in one_line(capsys.readouterr().err)
    assert os.path.islink(link) and os.path.exists(os.devnull)


def test_sigterm_while_writing_a_file_leaves_nothing(tmp_path):
    target = tmp_path / "x.npz"
    target.write_bytes(b"old")

    def terminated_midway(f):
        f.write(b"half")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal arrives first

    from kflats.cli._common import Terminated

    with pytest.raises(Terminated), sigterm_raises():
        write_file_atomically(str(target), terminated_midway, overwrite=True)
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.npz"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# --- --out of compress: checked before any heavy work -----------------------------


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if kflats compress gets as far as loading the model."""
    import kflats.torch.io
    import kflats.torch.io._original

    def load_model(source):
        raise AssertionError("the model was loaded before the mistake was found")

    # kflats compress reads it from the io package; load_pretrained from its
    # home module
    for module in (kflats.torch.io, kflats.torch.io._original):
        monkeypatch.setattr(module, "load_model", load_model)


def _compress(capsys, *argv):
    code = main(["compress", *map(str, argv), "--quiet", "--curve", "none"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    "make, match",
    [
        ("user-folder", "is not a folder kflats wrote (it holds no kflats.json)"),
        ("file", "is a file; kflats replaces only a folder it wrote"),
        ("device", "is a symbolic link; kflats replaces only a folder it wrote"),
        ("fake-marker-link", "is not a folder kflats wrote"),
    ],
)
def test_overwrite_refuses_what_kflats_did_not_write(
    make, match, tmp_path, capsys, no_model_load
):
    out = tmp_path / "out"
    if make == "user-folder":
        out.mkdir()
        (out / "thesis.tex").write_text("years of work")
    elif make == "file":
        out.write_text("precious")
    elif make == "device":
        os.symlink(os.devnull, out)
    else:  # a kflats.json that is a link to somewhere else
        out.mkdir()
        (tmp_path / "elsewhere.json").write_text("{}")
        os.symlink(tmp_path / "elsewhere.json", out / "kflats.json")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    code, stdout, stderr = _compress(capsys, "--out", out, "--overwrite")
    assert code == 2 and stdout == ""
    assert match in one_line(stderr)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert os.path.exists(os.devnull)


def test_device_node_out_is_refused(capsys, no_model_load):
    code, _, stderr = _compress(capsys, "--out", os.devnull, "--overwrite")
    assert code == 2
    assert one_line(stderr) == (
        f"kflats: --out '{os.devnull}' is not a folder; kflats replaces only a "
        "folder it wrote (one holding kflats.json)"
    )


def test_out_dot_is_refused_before_any_work(
    tmp_path, capsys, monkeypatch, no_model_load
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine.txt").write_text("mine")
    code, _, stderr = _compress(capsys, "--out", ".", "--overwrite")
    assert code == 2 and "'.' is not a folder kflats wrote" in one_line(stderr)
    (tmp_path / "kflats.json").write_text("{}")  # even a kflats folder: it is cwd
    code, _, stderr = _compress(capsys, "--out", ".", "--overwrite")
    assert code == 2 and "holds the current folder" in one_line(stderr)
    assert sorted(os.listdir(tmp_path)) == ["kflats.json", "mine.txt"]


@pytest.mark.parametrize(
    "out, match",
    [
        ("/proc/x", "--out '/proc/x': cannot write in '/proc'"),
        ("/proc/self/fd/9999/x", "cannot write in"),
    ],
)
def test_unwritable_out_is_found_first_and_names_no_temp_path(
    out, match, capsys, no_model_load
):
    code, _, stderr = _compress(capsys, "--out", out)
    line = one_line(stderr)
    assert code == 2 and match in line
    assert ".kflats" not in line and "probe" not in line


# --- SIGTERM during the save -------------------------------------------------------

_TERMINATED_IN_SAVE = """
import pathlib, sys, time
import kflats.torch
real = kflats.torch.save_compressed
def slow_save(model, folder, **kwargs):
    real(model, folder, **kwargs)
    pathlib.Path(sys.argv[1]).write_text("saving")
    time.sleep(60)
kflats.torch.save_compressed = slow_save
from kflats.cli.main import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigterm_during_save_leaves_nothing_behind(bert_dir, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    marker = tmp_path / "marker"
    argv = ["compress", str(bert_dir), "--out", str(work / "out")]
    argv += ["--targets", "embedding"]
    argv += ["--k", "1", "--budget", "0.3", "--unit", "numbers"]
    argv += ["--curve", "none", "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "1"}
    process = subprocess.Popen(
        [sys.executable, "-c", _TERMINATED_IN_SAVE, str(marker), *argv],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 600
        while not marker.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert [p.name for p in work.iterdir()][0].startswith(".out.kflats-")
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, stderr
    assert stderr.splitlines()[-1] == "kflats: terminated"
    assert "Traceback" not in stderr
    assert list(work.iterdir()) == []


@pytest.mark.parametrize("error", [ValueError, OSError])
def test_a_failed_write_names_out_not_the_hidden_folder(error, tmp_path):
    from kflats.cli._common import output_folder, write_folder_atomically

    out = output_folder(tmp_path / "out", False)

    def fill(folder):
        folder.mkdir()
        (folder / "half").write_text("half")
        raise error(f"cannot load {str(folder)!r}: bad")

    with pytest.raises(error) as caught:
        write_folder_atomically(out, fill, overwrite=False, shown="out")
    assert ".kflats" not in str(caught.value) and "'out'" in str(caught.value)
    assert os.listdir(tmp_path) == []


# --- MODEL_DIR a crafted GGUF file: its header checked before anything is read ----


def _crafted_ggufs():
    import struct

    from ..torch._gguf_models import gguf_bytes, gguf_kv, gguf_string, gguf_tensor_info

    arch = gguf_kv("general.architecture", 8, gguf_string("llama"))
    tokens = struct.pack("<IQ", 8, 10**8)  # 10**8 strings declared
    return {
        "array": (gguf_bytes([arch, gguf_kv("tokenizer.ggml.tokens", 9, tokens)]),
                  "metadata entry 'tokenizer.ggml.tokens' declares 100000000 "
                  "entries of STRING"),
        "beyond": (gguf_bytes([arch], [gguf_tensor_info("token_embd.weight",
                   (64, 10**6), 0, 0)], b"\0" * 64), "lies beyond the end"),
        "type": (gguf_bytes([arch], [gguf_tensor_info("token_embd.weight",
                 (64, 1), 99, 0)], b"\0" * 256), "has the unknown type 99"),
        "mamba": (gguf_bytes([gguf_kv("general.architecture", 8,
                  gguf_string("mamba"))]), "architecture 'mamba', for which "
                  "kflats has no adapter"),
        "q8_k": (gguf_bytes([arch], [gguf_tensor_info("token_embd.weight",
                 (256, 1), 15, 0)], b"\0" * 512), "of the GGUF type Q8_K"),
    }  # fmt: skip


@pytest.mark.parametrize("case", ["array", "beyond", "type", "mamba", "q8_k"])
def test_crafted_gguf_is_one_line(case, tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    crafted, match = _crafted_ggufs()[case]
    path = tmp_path / "crafted.gguf"
    path.write_bytes(crafted)
    code = main(["compress", str(path), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"kflats: MODEL_DIR '{path}'")
    assert match in err
    assert sorted(os.listdir(tmp_path)) == ["crafted.gguf"]
