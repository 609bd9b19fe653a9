import errno
import os
import pickle

import pytest
import torch

from dnad.checkpoint import (
    checkpoint_dir,
    flatten_state,
    load_checkpoint,
    load_latest,
    load_tensors_safely,
    save_checkpoint,
    unflatten_state,
)
from dnad.errors import CheckpointError


def state(v=1.0):
    opt = torch.optim.Adam([torch.nn.Parameter(torch.ones(3))], betas=(0.5, 0.999))
    return {
        "w": torch.full((2, 2), v),
        "opt": opt.state_dict(),
        "pos": {"epoch": 3, "t": (1, 2.5, None)},
        "rng": torch.get_rng_state(),
        "x": float("inf"),
    }


def test_flatten_roundtrip_keeps_int_keys_and_tuples():
    s = state()
    skel, tensors = flatten_state(s)
    back = unflatten_state(skel, tensors)
    assert back["pos"]["t"] == (1, 2.5, None) and back["x"] == float("inf")
    assert list(back["opt"]["param_groups"][0]["params"]) == [0]
    assert torch.equal(back["rng"], s["rng"])


def test_latest_falls_back_on_corruption_with_warning(tmp_path):
    save_checkpoint(checkpoint_dir(tmp_path, 1), state(1.0))
    p2 = save_checkpoint(checkpoint_dir(tmp_path, 2), state(2.0))
    assert float(load_latest(tmp_path)[1]["w"][0, 0]) == 2.0
    f = p2 / "tensors.safetensors"
    f.write_bytes(f.read_bytes()[:-7])  # truncated
    with pytest.warns(UserWarning, match="skipping unusable checkpoint"):
        path, s = load_latest(tmp_path)
    assert path.name == "checkpoint_000001" and float(s["w"][0, 0]) == 1.0
    with pytest.raises(CheckpointError):
        load_checkpoint(p2)


def test_missing_manifest_is_an_interrupted_write(tmp_path):
    p = save_checkpoint(checkpoint_dir(tmp_path, 1), state())
    (p / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest"):
        load_checkpoint(p)


def test_enospc_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    save_checkpoint(checkpoint_dir(tmp_path, 1), state(1.0))
    import dnad.checkpoint as ck

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_file", full)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(checkpoint_dir(tmp_path, 2), state(2.0))
    assert not checkpoint_dir(tmp_path, 2).exists()
    assert float(load_latest(tmp_path)[1]["w"][0, 0]) == 1.0


class Boom:
    def __reduce__(self):
        return (os.system, ("touch /tmp/dnad_pwned",))


def test_malicious_pickle_is_refused_without_running(tmp_path):
    bad = tmp_path / "evil.pt"
    with open(bad, "wb") as f:
        pickle.dump({"w": Boom()}, f)
    if os.path.exists("/tmp/dnad_pwned"):
        os.remove("/tmp/dnad_pwned")
    with pytest.raises(CheckpointError, match="refused"):
        load_tensors_safely(bad)
    assert not os.path.exists("/tmp/dnad_pwned")
    good = tmp_path / "good.pt"
    torch.save({"w": torch.ones(2)}, good)
    assert torch.equal(load_tensors_safely(good)["w"], torch.ones(2))


def _truncate(f):
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])


def _flip_bit(f):
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit: the size stays, only the hash can tell
    f.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "name"),
    [
        (_truncate, "tensors.safetensors"),
        (_flip_bit, "tensors.safetensors"),
        (_flip_bit, "state.json"),
        (_truncate, "manifest.json"),
    ],
)
def test_damaged_newest_checkpoint_gives_one_warning_and_the_previous_one(tmp_path, damage, name):
    save_checkpoint(checkpoint_dir(tmp_path, 1), state(1.0))
    p2 = save_checkpoint(checkpoint_dir(tmp_path, 2), state(2.0))
    size = (p2 / name).stat().st_size
    damage(p2 / name)
    assert damage is _truncate or (p2 / name).stat().st_size == size
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path, s = load_latest(tmp_path)
    assert path.name == "checkpoint_000001" and float(s["w"][0, 0]) == 1.0
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "\n" not in msg and "checkpoint_000002" in msg and "previous" in msg


def test_enospc_while_writing_state_names_the_checkpoint_and_keeps_the_previous(tmp_path, monkeypatch):
    """ENOSPC from a plain file write (state.json / manifest), not only from safetensors."""
    save_checkpoint(checkpoint_dir(tmp_path, 1), state(1.0))
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(os, "fdopen", lambda *a, **k: FullDisk(real_fdopen(*a, **k)))
    with pytest.raises(OSError) as info:
        save_checkpoint(checkpoint_dir(tmp_path, 2), state(2.0))
    monkeypatch.undo()
    assert info.value.errno == errno.ENOSPC
    assert "checkpoint_000002" in str(info.value) and "No space left" in str(info.value)
    assert not checkpoint_dir(tmp_path, 2).exists()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_000001"]  # no temp files either
    assert sorted(p.name for p in checkpoint_dir(tmp_path, 1).iterdir()) == [
        "manifest.json",
        "state.json",
        "tensors.safetensors",
    ]
    assert float(load_latest(tmp_path)[1]["w"][0, 0]) == 1.0
