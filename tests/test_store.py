"""Feature stores: content, resume after a kill, refusal on mismatch, two-process equality."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffattr.attribution.featurize import aggregate, featurize, per_step_features
from diffattr.attribution.store import (
    FeatureStore,
    IncompleteStoreError,
    StoreMismatchError,
)
from diffattr.repro import MismatchError

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "scripts" / "featurize_worker.py"


def _worker_module():
    spec = importlib.util.spec_from_file_location("featurize_worker", WORKER)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


build_inputs = _worker_module().build_inputs


def _shard_files(path: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted((path / "shards").iterdir())}


def test_store_content_and_manifest(tmp_path: Path) -> None:
    model, data, args = build_inputs()
    store = featurize(model, data, tmp_path / "s", args, progress=False)
    ts = args.timesteps.timesteps()
    want = aggregate(per_step_features(model, data.images, data.ids, ts, args), "mean")
    assert torch.equal(store.ids, data.ids)
    # float32 round-off differs with the batch composition (shards of 3 vs all 10 at once).
    assert want.abs().max() > 0.1
    torch.testing.assert_close(store.features, want, rtol=1e-4, atol=2e-5)
    m = FeatureStore.open(tmp_path / "s").manifest
    ident = m["identity"]
    assert m["kind"] == "feature-store" and m["complete"] and m["num_shards"] == 4
    assert ident["model_hash"] == model.model_hash() and ident["data_hash"] == data.data_hash()
    assert ident["output"] == "loss" and ident["timesteps"] == ts == store.timesteps
    assert ident["projector"] == args.projector.to_dict() and ident["label"] == "worker-test"
    assert m["feature_shape"] == [10, 64] and m["ids"] == data.ids.tolist()
    # Per-step aggregate in float16.
    args.aggregate, args.dtype = "per-step", "float16"
    per = featurize(model, data, tmp_path / "p", args, progress=False)
    assert per.features.shape == (10, 2, 64) and per.features.dtype == torch.float32
    torch.testing.assert_close(per.features.mean(dim=1), want, rtol=2e-3, atol=2e-3)


class Killed(RuntimeError):
    pass


def test_killed_and_resumed_store_is_identical(tmp_path: Path) -> None:
    model, data, args = build_inputs()
    ref = featurize(model, data, tmp_path / "ref", args, progress=False)

    def kill_after_1(i: int) -> None:
        if i == 1:
            raise Killed

    with pytest.raises(Killed):
        featurize(model, data, tmp_path / "run", args, progress=False, on_shard=kill_after_1)
    with pytest.raises(IncompleteStoreError, match="incomplete"):
        FeatureStore.open(tmp_path / "run")
    shards = tmp_path / "run" / "shards"
    # A half-written temporary file of shard 2 and a shard 3 file whose completion record never
    # got written (killed between rename and record), plus a record that disagrees with shard 1.
    (shards / ".shard_00002.safetensors.tmp999").write_bytes(b"\x00garbage")
    (shards / "shard_00003.safetensors").write_bytes(b"truncated")
    computed: list[int] = []
    store = featurize(model, data, tmp_path / "run", args, progress=False, on_shard=computed.append)
    assert computed == [2, 3]  # shards 0 and 1 were not recomputed
    assert torch.equal(store.features, ref.features)
    ref_files = _shard_files(tmp_path / "ref")
    got = {k: v for k, v in _shard_files(tmp_path / "run").items() if not k.startswith(".")}
    assert got == ref_files
    # A corrupted complete shard (record no longer matches) is recomputed, not read.
    (shards / "shard_00001.safetensors").write_bytes(b"corrupt")
    (tmp_path / "run" / "manifest.json").write_text(
        json.dumps(
            {**json.loads((tmp_path / "run" / "manifest.json").read_text()), "complete": False}
        )
    )
    computed.clear()
    store = featurize(model, data, tmp_path / "run", args, progress=False, on_shard=computed.append)
    assert computed == [1]
    assert torch.equal(store.features, ref.features)
    # A finished store is returned without recomputation.
    computed.clear()
    featurize(model, data, tmp_path / "run", args, progress=False, on_shard=computed.append)
    assert computed == []


def test_reopen_with_other_args_model_or_data_is_refused(tmp_path: Path) -> None:
    model, data, args = build_inputs()
    out = tmp_path / "s"
    store = featurize(model, data, out, args, progress=False)
    args.output = "square"
    with pytest.raises(StoreMismatchError, match="output: folder has 'loss', asked for 'square'"):
        featurize(model, data, out, args, progress=False)
    _, _, args = build_inputs()
    args.projector.seed = 9
    with pytest.raises(StoreMismatchError, match=r"projector\.seed"):
        featurize(model, data, out, args, progress=False)
    _, _, args = build_inputs()
    with torch.no_grad():
        model.unet.conv_out.bias.add_(1.0)
    with pytest.raises(StoreMismatchError, match="model_hash") as info:
        featurize(model, data, out, args, progress=False)
    assert isinstance(info.value, MismatchError)
    with pytest.raises(StoreMismatchError, match="model_hash differs"):
        store.check_model(model)
    model2, data2, _ = build_inputs(n=9)
    store.check_model(model2)  # the original weights: accepted
    with pytest.raises(StoreMismatchError, match="data_hash"):
        featurize(model2, data2, out, args, progress=False)


def test_two_processes_equal_single_process(tmp_path: Path) -> None:
    model, data, args = build_inputs()
    # Same thread count as each worker: CPU kernels round differently with more threads.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = featurize(model, data, tmp_path / "single", args, progress=False)
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc_per_node",
        "2",
        str(WORKER),
        str(tmp_path / "multi"),
    ]
    # Own process group, so a hang never leaves worker processes behind.
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    res = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rank 0/2" in res.stdout
    multi = FeatureStore.open(tmp_path / "multi")
    assert torch.equal(multi.ids, single.ids)
    torch.testing.assert_close(multi.features, single.features, rtol=1e-6, atol=1e-6)
    assert multi.manifest["identity"] == single.manifest["identity"]
