"""Weights from outside: crafted safetensors files and pickles are refused before anything big
is allocated; NaN/Inf values are counted; published rows and layouts are checked."""

from __future__ import annotations

import json
import pickle
import struct
import tracemalloc

import numpy as np
import pytest
import torch
from safetensors.numpy import load as load_reference
from safetensors.numpy import save as save_numpy
from safetensors.torch import save as save_torch

from pipeline.safe_weights import (
    UnsafeWeightsError,
    WeightLimits,
    load_weights,
    load_weights_file,
    read_safetensors,
)

from .conftest import SHAPES, smoke_overrides


def craft(header: dict, data: bytes = b"", header_len: int | None = None) -> bytes:
    """A safetensors file with exactly this header and data (and optionally a lying length)."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if header_len is None else header_len) + text + data


def entry(dtype="F32", shape=(2, 2), begin=0, end=16) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


def check_refused_cheaply(data: bytes, match: str) -> None:
    """Refused with `match`, and the check allocated under 1 MB (it never decoded the claim)."""
    tracemalloc.start()
    try:
        with pytest.raises(UnsafeWeightsError, match=match):
            read_safetensors(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes allocated while refusing"


def test_real_files_read_the_same_as_the_safetensors_library():
    tensors = {"a.lora_A.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
               "a.lora_B.weight": np.linspace(-1, 1, 8, dtype=np.float16).reshape(4, 2),
               "scalar": np.array(2.5, dtype=np.float64), "empty": np.zeros((0, 3), np.float32)}
    data = save_numpy(tensors, metadata={"format": "np"})
    ours, reference = read_safetensors(data).tensors, load_reference(data)
    assert ours.keys() == reference.keys()
    assert all(ours[k].dtype == reference[k].dtype and np.array_equal(ours[k], reference[k]) for k in ours)
    bf16 = torch.tensor([[1.5, -2.0], [3.25, 0.0]], dtype=torch.bfloat16)
    widened = read_safetensors(save_torch({"w": bf16})).tensors["w"]
    assert widened.dtype == np.float32 and np.array_equal(widened, bf16.float().numpy())


def test_an_oversized_header_length_is_refused_before_reading_it():
    check_refused_cheaply(craft({}, header_len=2**63), "header claims")
    check_refused_cheaply(craft({}, header_len=(16 << 20) + 1), "header claims")
    check_refused_cheaply(craft({"w": entry()}, b"\x00" * 16, header_len=10_000), "truncated")


def test_a_header_claiming_a_huge_tensor_is_refused_before_allocating():
    check_refused_cheaply(craft({"w": entry(shape=(2**31, 2**31), end=2**64)}), "claims .* elements")
    check_refused_cheaply(craft({"w": entry(shape=(1 << 27, 4), end=(1 << 31))}, b"\x00" * 64), "claims .* elements")
    small = WeightLimits(max_total_bytes=1024)
    with pytest.raises(UnsafeWeightsError, match="more than 1024 bytes"):
        read_safetensors(craft({"w": entry(shape=(16, 32), end=2048)}, b"\x00" * 2048), small)


@pytest.mark.parametrize("dtype", ["I64", "U8", "BOOL", "F8_E4M3", "I32", "object", 7])
def test_dtypes_outside_the_allow_list_are_refused(dtype):
    check_refused_cheaply(craft({"w": entry(dtype=dtype)}, b"\x00" * 16), "dtype")


@pytest.mark.parametrize("header, match", [
    ({"w": entry(shape=(-2, 2))}, "shape"),
    ({"w": entry(shape=(True, 2))}, "shape"),
    ({"w": entry(shape=[1] * 9, end=4)}, "shape"),
    ({"w": entry(end=12)}, "do not hold"),
    ({"w": entry(begin=8, end=24)}, "starts at byte 8"),
    ({"w": entry(), "v": entry(begin=8, end=24)}, "overlap or gap"),
    ({"w": {"dtype": "F32", "shape": [2, 2]}}, "not described"),
    ({"w": entry(), "__metadata__": {"k": 1}}, "__metadata__"),
])
def test_malformed_headers_are_refused(header, match):
    check_refused_cheaply(craft(header, b"\x00" * 16), match)


def test_not_json_and_not_an_object_are_refused():
    check_refused_cheaply(struct.pack("<Q", 4) + b"\xff\xfe{}" + b"\x00" * 8, "not JSON")
    check_refused_cheaply(craft([1, 2]), "not an object")  # type: ignore[arg-type]
    check_refused_cheaply(b"\x01\x02", "too short")


def test_truncated_and_padded_data_are_refused():
    data = save_numpy({"w": np.ones((8, 8), np.float32)})
    for cut in (1, 7, 100, 255):
        check_refused_cheaply(data[:-cut], "truncated")
    check_refused_cheaply(data + b"\x00" * 4, "trailing bytes")


def test_nan_and_inf_are_counted_and_fail_by_default():
    w = np.ones((4, 4), np.float32)
    w[0, 0], w[1, 2], w[3, 3] = np.nan, np.inf, -np.inf
    data = save_numpy({"w": w, "ok": np.ones(3, np.float32)})
    with pytest.raises(UnsafeWeightsError, match="3 NaN/Inf value"):
        read_safetensors(data)
    counted = read_safetensors(data, non_finite="count")
    assert counted.non_finite == {"w": 3} and counted.non_finite_total == 3


class RunsCode:
    """Unpickling this runs `touch MARKER`: what a hostile .bin checkpoint can do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def test_pickle_checkpoints_are_refused_unless_trusted(tmp_path):
    state = {"a.lora_A.weight": torch.ones(2, 3), "a.lora_B.weight": torch.zeros(3, 2)}
    torch.save(state, tmp_path / "adapter_model.bin")
    with pytest.raises(UnsafeWeightsError, match="pickle.*--trust-remote-pickle"):
        load_weights_file(tmp_path / "adapter_model.bin")
    (tmp_path / "disguised.safetensors").write_bytes((tmp_path / "adapter_model.bin").read_bytes())
    with pytest.raises(UnsafeWeightsError, match="pickle"):  # sniffed by content, whatever the name
        load_weights_file(tmp_path / "disguised.safetensors")
    trusted = load_weights_file(tmp_path / "adapter_model.bin", trust_remote_pickle=True)
    assert np.array_equal(trusted.tensors["a.lora_A.weight"], np.ones((2, 3), np.float32))


def test_a_code_running_pickle_is_refused_even_when_trusted(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"w": RunsCode(marker)}, protocol=2)
    for name in ("evil.pkl", "evil.safetensors"):
        with pytest.raises(UnsafeWeightsError, match="pickle"):
            load_weights(payload, name)
        with pytest.raises(UnsafeWeightsError, match="not a plain tensor checkpoint"):
            load_weights(payload, name, trust_remote_pickle=True)  # weights_only=True still applies
    assert not marker.exists()


def restage(population, job_id: str, staged):
    """Move a committed job's files to `staged` (to be changed and committed again)."""
    import shutil

    shutil.copytree(population.store.local_path(population.job_rel(job_id, "adapter")), staged / "adapter")
    population.store.delete(population.job_rel(job_id, "adapter"))
    return staged


def test_publish_reads_stored_adapters_safely(smoke_copy, run_cli, tmp_path):
    """The store side: a pickle adapter is refused (publish stops, names it) unless trusted;
    an adapter with NaN weights is left out of the dataset and listed with its count."""
    from pipeline.publish import PublishError, publish_population, read_adapter

    store, manifest = smoke_copy
    population = store.population(manifest.population.name)
    first, second = sorted(population.job_ids())[:2]
    staged = restage(population, first, tmp_path / "staged")
    tensors = load_reference((staged / "adapter" / "adapter_model.safetensors").read_bytes())
    (staged / "adapter" / "adapter_model.safetensors").unlink()
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, staged / "adapter" / "adapter_model.bin")
    population.commit(first, staged, {"imported": True})  # a recorded, verifying pickle adapter
    with pytest.raises(UnsafeWeightsError, match="pickle"):
        read_adapter(store, population.job_rel(first, "adapter"))
    code, _, err = run_cli("publish", SHAPES, *smoke_overrides(manifest.base.ref), "--store", store.url)
    assert code == 2 and "refusing to load" in err and "--trust-remote-pickle" in err
    code, out, err = run_cli("publish", SHAPES, *smoke_overrides(manifest.base.ref), "--store", store.url, "--trust-remote-pickle")
    assert code == 0, err

    staged = restage(population, second, tmp_path / "staged2")
    poisoned = load_reference((staged / "adapter" / "adapter_model.safetensors").read_bytes())
    name = sorted(poisoned)[0]
    poisoned[name] = poisoned[name].copy()
    poisoned[name].flat[:5] = np.nan
    (staged / "adapter" / "adapter_model.safetensors").write_bytes(save_numpy(poisoned))
    population.commit(second, staged, {})
    nan_adapter = store.local_path(population.job_rel(second, "adapter"))
    summary = publish_population(manifest, store, trust_remote_pickle=True)
    assert summary.excluded == {second: "5 NaN/Inf weight value(s)"} and sum(summary.rows.values()) == 3
    with pytest.raises(PublishError, match="damaged"):  # a changed byte is damage, not a NaN to skip
        (nan_adapter / "adapter_model.safetensors").write_bytes(save_numpy({"x": np.ones(2, np.float32)}))
        publish_population(manifest, store, trust_remote_pickle=True)


def _published_folder(tmp_path, weights: np.ndarray, layout: dict):
    import datasets

    from pipeline.publish import in_memory_dataset

    rows = [{"job_id": f"job{i}", "group": f"g{i}", "rank": 2, "alpha": 2.0, "label": float(i)} for i in range(len(weights))]
    folder = tmp_path / "published"
    datasets.DatasetDict({"train": in_memory_dataset(rows, weights)}).save_to_disk(str(folder / "arrow"))
    (folder / "layout.json").write_text(json.dumps(layout))
    (folder / "labels.json").write_text(json.dumps({"label": {"scorer": "s", "scorer_id": "s-1", "label": "label"}}))
    return folder


def _layout():
    from lol_models.published import make_layout

    return make_layout({"m": (np.zeros((2, 3), np.float32), np.zeros((4, 2), np.float32))}, 2)


def test_pull_fails_on_nan_rows_or_skips_them_with_a_count(tmp_path, run_cli):
    from lol_models.data import PulledDataError, pull, stream

    layout = _layout()
    weights = np.random.default_rng(0).standard_normal((5, layout["size"])).astype(np.float32)
    weights[1, 3], weights[3, :4] = np.inf, np.nan
    folder = _published_folder(tmp_path, weights, layout)
    with pytest.raises(PulledDataError, match="2 row.*NaN/Inf.*job1"):
        pull(folder)
    kept = pull(folder, non_finite="skip")
    assert kept.job_ids == ["job0", "job2", "job4"] and kept.skipped == {"job1": 1, "job3": 4}
    assert torch.isfinite(kept.weights.groups[0].u).all()
    assert sum(len(b) for b in stream(folder, non_finite="skip", batch_size=2)) == 3
    code, out, _ = run_cli("pull", folder, "--non-finite", "skip")
    assert code == 0 and "skipped 2 row(s) with NaN/Inf weights" in out
    code, _, err = run_cli("pull", folder)
    assert code == 2 and "NaN/Inf" in err


@pytest.mark.parametrize("edit, match", [
    (lambda layout: layout["modules"][0].update(a_offset=10**12), "passes the row"),
    (lambda layout: layout["modules"][0].update(b_offset=0), "overlaps"),
    (lambda layout: layout["modules"][0].update({"in": -1}), "in/out"),
    (lambda layout: layout.update(max_rank=0), "max_rank"),
    (lambda layout: layout["modules"].append(dict(layout["modules"][0])), "repeated"),
    (lambda layout: layout.update(modules="x"), "modules"),
])
def test_hostile_layouts_are_refused_by_pull_and_row_to_adapter(tmp_path, edit, match):
    from lol_models.data import PulledDataError, pull
    from lol_models.published import row_to_adapter

    layout = _layout()
    weights = np.ones((2, layout["size"]), np.float32)
    edit(layout)
    folder = _published_folder(tmp_path, weights, layout)
    with pytest.raises(PulledDataError, match=match):
        pull(folder)
    row = {"job_id": "j", "rank": 2, "weights": weights[0], "adapter_config": "{}"}
    with pytest.raises(PulledDataError, match=match):
        row_to_adapter(row, layout, tmp_path / "adapter")


def test_row_to_adapter_checks_the_row(tmp_path):
    from lol_models.published import PulledDataError, row_to_adapter

    layout = _layout()
    good = {"job_id": "j", "rank": 2, "weights": np.ones(layout["size"], np.float32), "adapter_config": '{"r": 2}'}
    assert (row_to_adapter(good, layout, tmp_path / "ok") / "adapter_model.safetensors").is_file()
    for change, match in (({"rank": 3}, "rank"), ({"rank": "2"}, "rank"), ({"weights": np.ones(3)}, "weights"),
                          ({"adapter_config": "[1]"}, "adapter_config"), ({"adapter_config": "{"}, "adapter_config"),
                          ({"weights": np.full(layout["size"], np.nan, np.float32)}, "NaN")):
        with pytest.raises(PulledDataError, match=match):  # a published row is outside data, like a pulled one
            row_to_adapter({**good, **change}, layout, tmp_path / "bad")
