"""Bad data: a corrupt image stops training with one error naming the file and loses nothing;
CIFAR-10 labels that are not class indices 0..9 are refused, never truncated."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

pytest.importorskip("safetensors", reason="checkpoints need safetensors (archopt[train])")
pytest.importorskip("PIL")

from archopt.errors import DataError
from archopt.train import load_data, train
from archopt.train.files import CIFAR10_TEST_FILE

from .test_train import tiny, write_fake_cifar, write_image_tree

RUN = dict(epochs=2, resolution=8, batch_size=4, bf16="off", progress=False, verbose=False)


def _relabel(folder, name, labels):
    path = folder / name
    batch = pickle.loads(path.read_bytes())
    batch["labels"] = labels
    path.write_bytes(pickle.dumps(batch, protocol=2))


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([3.7] * 12, r"labels must be a flat list of integer class indices 0\.\.9, got "
                     r"'float64 values of shape \(12,\) such as \[3\.7, 3\.7, 3\.7\]'"),
        ([3.0] * 12, r"got 'float64 values of shape \(12,\) such as \[3\.0"),
        ([True] * 12, r"got 'bool values"),
        (["3"] * 12, r"got \"<U1 values of shape"),
        ([[1]] * 12, r"got 'int64 values of shape \(12, 1\)"),
        ([1] * 11 + [10], r"labels must be class indices in 0\.\.9, got '10 among them'"),
        ([-1] + [1] * 11, r"labels must be class indices in 0\.\.9, got '-1 among them'"),
        ([1] * 11 + [2**70], r"labels must be a flat list of integer class indices"),
    ],
    ids=["float", "integral-float", "bool", "str", "nested", "ten", "negative", "huge"],
)  # fmt: skip
def test_cifar_labels_that_are_not_class_indices_are_refused(tmp_path, labels, message):
    write_fake_cifar(tmp_path)
    _relabel(tmp_path, CIFAR10_TEST_FILE, labels)
    with pytest.raises(DataError, match=message) as e:
        load_data(f"cifar10:{tmp_path}")
    assert str(tmp_path / CIFAR10_TEST_FILE) in str(e.value)


def test_cifar_integer_labels_of_any_width_load(tmp_path):
    write_fake_cifar(tmp_path)
    _relabel(tmp_path, CIFAR10_TEST_FILE, np.arange(12, dtype=np.uint8) % 10)
    d = load_data(f"cifar10:{tmp_path}")
    assert d.val.labels.tolist() == [i % 10 for i in range(12)]


@pytest.mark.parametrize("damage", ["not an image", "truncated", "empty"])
@pytest.mark.parametrize("workers", [0, 1])
def test_a_corrupt_image_stops_training_with_its_name_and_loses_nothing(tmp_path, damage, workers):
    tree, out = tmp_path / "tree", tmp_path / "run"
    write_image_tree(tree, per_class=6)
    common = dict(RUN, out_dir=out, num_workers=workers)
    train(tiny(in_chans=3, num_classes=2), f"folder:{tree}", stop_after=1, **common)
    checkpoint = (out / "checkpoint.safetensors").read_bytes()
    metrics = (out / "metrics.jsonl").read_text()
    bad = tree / "dog" / "img3.png"
    good = bad.read_bytes()
    bad.write_bytes(
        {"not an image": b"hello", "truncated": good[: len(good) // 2], "empty": b""}[damage]
    )
    with pytest.raises(
        DataError, match=rf"{bad}: cannot read this image \(\w+: .+\); replace"
    ) as e:
        train(tiny(in_chans=3, num_classes=2), f"folder:{tree}", resume=True, **common)
    assert "\n" not in str(e.value) and "Traceback" not in str(e.value)
    # the last finished epoch is intact, and the run continues once the file is fixed
    assert (out / "checkpoint.safetensors").read_bytes() == checkpoint
    assert (out / "metrics.jsonl").read_text() == metrics
    bad.write_bytes(good)
    r = train(tiny(in_chans=3, num_classes=2), f"folder:{tree}", resume=True, **common)
    assert r.epochs_done == 2


def test_the_command_line_says_it_in_one_line(tmp_path, capsys):
    from archopt.cli import main

    tree = tmp_path / "tree"
    write_image_tree(tree, per_class=4)
    (tree / "cat" / "img0.png").write_bytes(b"GIF89a broken")
    code = main(["train", "mobilenet_v1_025", "--data", f"folder:{tree}", "--epochs", "1",
                 "--resolution", "32", "--bf16", "off", "--out", str(tmp_path / "o"),
                 "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"archopt: error: {tree / 'cat' / 'img0.png'}: cannot")
    assert err.count("\n") == 1


DDP_FOLDER_SCRIPT = """
import sys
from archopt.errors import DataError
from archopt.train import train
from tests.test_train import tiny

kw = dict(epochs=2, resolution=8, batch_size=4, bf16="off", progress=False, verbose=False)
try:
    train(tiny(in_chans=3, num_classes=2), f"folder:{sys.argv[1]}", out_dir=sys.argv[2],
          stop_after=int(sys.argv[3]) or None, resume=sys.argv[3] == "0", **kw)
except DataError as e:
    print(f"archopt: error: {e}", file=sys.stderr)
    sys.exit(2)
"""


def test_a_corrupt_image_under_two_processes_stops_both_and_loses_nothing(tmp_path):
    """DDP: one rank meets the corrupt file and exits with its name; torchrun stops the
    other (waiting in an all-reduce) instead of leaving it hung, and the checkpoint of the
    last finished epoch is intact."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from .test_train import _free_port

    tree, out = tmp_path / "tree", tmp_path / "run"
    write_image_tree(tree, per_class=8)
    script = tmp_path / "ddp_folder.py"
    script.write_text(DDP_FOLDER_SCRIPT)
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo",
           "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}  # fmt: skip

    def torchrun(stop_after: int) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
               str(script), str(tree), str(out), str(stop_after)]  # fmt: skip
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)

    first = torchrun(1)
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = (out / "checkpoint.safetensors").read_bytes()
    bad = tree / "dog" / "img3.png"
    bad.write_bytes(b"not an image")
    second = torchrun(0)  # resume: the second epoch reads the corrupt file on one rank
    assert second.returncode != 0
    assert f"archopt: error: {bad}: cannot read this image" in second.stderr
    assert (out / "checkpoint.safetensors").read_bytes() == checkpoint
