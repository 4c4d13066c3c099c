"""The weights dataset: collecting LoRA folders and all_weights.pt into shards, appending, reading, faults."""
import json

import pytest
import torch

from lora_w2w.cli import main
from lora_w2w.dataset import (INDEX_JSON, WeightsDataset, add_models, collect_all_weights, collect_folders,
                              discover_loras, matrix_source)
from lora_w2w.errors import FileFormatError, LayoutError, OutputError, SpaceError, W2WError
from lora_w2w.formats import load_kohya, load_peft, save_kohya, save_peft
from lora_w2w.layout import LoraLayer, LoraLayout
from lora_w2w.storage import read_safetensors_header

SMALL = LoraLayout((LoraLayer("a.attn1.to_q", 6, 5), LoraLayer("a.attn1.to_v", 6, 5)))  # N = 22


def write_loras(root, names, layout=SMALL, seed=0):
    """PEFT folders as training writes them (<name>/unet/), a flat PEFT folder and a kohya file."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for i, name in enumerate(names):
        weights[name] = torch.randn(layout.numel, generator=g)
        if i % 3 == 0:
            save_peft(layout, weights[name], root / name / "unet", "base/model")
        elif i % 3 == 1:
            save_peft(layout, weights[name], root / name, "base/model")
        else:
            save_kohya(layout, weights[name], root / f"{name}.safetensors")
    return weights


def test_collect_orders_models_by_name_and_reads_them_back(tmp_path):
    names = ["b10", "a", "b2", "c", "B", "b1", "x_9"]
    weights = write_loras(tmp_path / "runs", names)
    (tmp_path / "runs" / "notes.txt").write_text("ignored")
    report = collect_folders(tmp_path / "runs", tmp_path / "data", shard_size=3)
    dataset = report.dataset
    assert dataset.names == tuple(sorted(names)) == ("B", "a", "b1", "b10", "b2", "c", "x_9")  # plain string order
    assert [s.rows for s in dataset.shards] == [3, 3, 1] and report.added == 7
    assert dataset.layout == SMALL and dataset.base_model == "base/model"
    expected = torch.stack([weights[name] for name in dataset.names])  # (M, N)
    assert torch.equal(dataset.read_rows(0, len(dataset)), expected)
    assert torch.equal(dataset["b10"], weights["b10"]) and torch.equal(dataset[-1], weights["x_9"])
    assert torch.equal(dataset.read_columns(3, 17), expected[:, 3:17])
    assert torch.equal(dataset.read_block(2, 6, 5, 9), expected[2:6, 5:9])          # across a shard boundary
    chunks = list(dataset.iter_chunks(2))
    assert [start for start, _ in chunks] == [0, 2, 4, 6]
    assert torch.equal(torch.cat([chunk for _, chunk in chunks]), expected)
    index = json.loads((tmp_path / "data" / INDEX_JSON).read_text())
    assert (index["format"], index["version"], index["names"]) == ("w2w-weights", 1, sorted(names))
    assert [s["file"] for s in index["shards"]] == [f"weights-0000{i}.safetensors" for i in range(3)]
    with pytest.raises(W2WError, match="no model named 'zz'"):
        dataset["zz"]
    with pytest.raises(W2WError, match="index 7 is out of range"):
        dataset[7]


def test_rerun_adds_only_new_models_and_keeps_name_order(tmp_path):
    root = tmp_path / "runs"
    weights = write_loras(root, ["m03", "m05", "m07", "m09", "m11"])
    collect_folders(root, tmp_path / "data", shard_size=2)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "data").glob("weights-*")}
    assert collect_folders(root, tmp_path / "data").added == 0

    weights |= write_loras(root, ["m12", "m13"], seed=1)             # after the last: only the last shard changes
    report = collect_folders(root, tmp_path / "data")
    assert (report.added, report.rewritten) == (2, 1)
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "data").glob("weights-*")}
    assert all(kept[name] == before[name] for name in ("weights-00000.safetensors", "weights-00001.safetensors"))

    weights |= write_loras(root, ["m06", "m00"], seed=2)              # before existing ones: shards rewritten
    report = collect_folders(root, tmp_path / "data")
    dataset = report.dataset
    assert (report.added, report.rewritten) == (2, 7)
    assert list(dataset.names) == sorted(weights)
    assert torch.equal(dataset.read_rows(0, len(dataset)), torch.stack([weights[n] for n in sorted(weights)]))
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == [INDEX_JSON] + [s.file for s in dataset.shards]


def test_bad_models_are_refused_by_name_and_leave_the_dataset_as_it_was(tmp_path):
    root = tmp_path / "runs"
    write_loras(root, ["a", "b", "c", "d"])
    collect_folders(root, tmp_path / "data", shard_size=2)
    index = (tmp_path / "data" / INDEX_JSON).read_text()

    other = LoraLayout((LoraLayer("a.attn1.to_q", 6, 5), LoraLayer("a.attn1.to_v", 6, 7)))
    save_peft(other, torch.zeros(other.numel), root / "e_other")
    with pytest.raises(LayoutError, match="e_other"):
        collect_folders(root, tmp_path / "data")
    (root / "e_other" / "adapter_model.safetensors").unlink()

    bad = torch.zeros(SMALL.numel)
    bad[4] = float("nan")
    for name in ("aa", "e_nan"):                 # a shard is written before the NaN is met: the run fails midway
        save_peft(SMALL, torch.ones(SMALL.numel), root / name)
    save_peft(SMALL, bad, root / "e_nan")
    with pytest.raises(SpaceError, match="model 'e_nan'.*NaN/inf"):
        collect_folders(root, tmp_path / "data")
    assert (tmp_path / "data" / INDEX_JSON).read_text() == index
    assert len(WeightsDataset(tmp_path / "data")) == 4

    save_peft(SMALL, torch.ones(SMALL.numel), root / "e_nan")            # fixed: the rerun finishes the job
    report = collect_folders(root, tmp_path / "data")
    assert report.added == 2 and report.skipped == ["e_other"]         # a folder without a LoRA is reported
    files = sorted(p.name for p in (tmp_path / "data").iterdir())
    assert files == [INDEX_JSON] + [s.file for s in report.dataset.shards]             # stale shards removed


def test_empty_folders_and_name_clashes(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileFormatError, match="no LoRA found"):
        discover_loras(tmp_path / "empty")
    (tmp_path / "empty" / "unfinished").mkdir()
    with pytest.raises(FileFormatError, match="1 folders hold none, e.g. 'unfinished'"):
        collect_folders(tmp_path / "empty", tmp_path / "data")
    with pytest.raises(FileFormatError, match="no such folder"):
        discover_loras(tmp_path / "missing")
    save_peft(SMALL, torch.zeros(SMALL.numel), tmp_path / "clash" / "a")
    save_kohya(SMALL, torch.zeros(SMALL.numel), tmp_path / "clash" / "a.safetensors")
    with pytest.raises(FileFormatError, match="two LoRAs named 'a'"):
        discover_loras(tmp_path / "clash")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    write_loras(tmp_path / "runs", ["a"])
    with pytest.raises(OutputError, match="is not a weights dataset"):
        collect_folders(tmp_path / "runs", tmp_path / "full")
    only_kohya = tmp_path / "kohya"
    save_kohya(SMALL, torch.zeros(SMALL.numel), only_kohya / "k.safetensors")
    with pytest.raises(LayoutError, match="kohya file does not say its module names"):
        collect_folders(only_kohya, tmp_path / "data")
    assert collect_folders(only_kohya, tmp_path / "data", layout=SMALL).added == 1


def test_truncated_or_corrupt_shards_are_named(tmp_path):
    m = torch.randn(5, SMALL.numel)
    add_models(tmp_path / "data", matrix_source(m, list("abcde")), SMALL, shard_size=2)
    shard = tmp_path / "data" / "weights-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-8])
    with pytest.raises(FileFormatError, match="weights-00001.safetensors: truncated"):
        WeightsDataset(tmp_path / "data")
    shard.write_bytes(b"\xff" * len(data))
    with pytest.raises(FileFormatError, match="weights-00001.safetensors: not a valid safetensors"):
        WeightsDataset(tmp_path / "data")
    shard.unlink()
    with pytest.raises(FileFormatError, match="weights-00001.safetensors: no such file"):
        WeightsDataset(tmp_path / "data")
    (tmp_path / "data" / INDEX_JSON).write_text("{")
    with pytest.raises(FileFormatError, match="index.json: invalid JSON"):
        WeightsDataset(tmp_path / "data")
    with pytest.raises(FileFormatError, match="not a weights dataset"):
        WeightsDataset(tmp_path)


def test_an_index_with_names_out_of_order_is_refused_as_a_source_would_be(tmp_path):
    add_models(tmp_path / "data", matrix_source(torch.randn(3, SMALL.numel), list("abc")), SMALL)
    index = json.loads((tmp_path / "data" / INDEX_JSON).read_text())
    index["names"] = ["a", "c", "b"]
    (tmp_path / "data" / INDEX_JSON).write_text(json.dumps(index))
    with pytest.raises(FileFormatError, match=r"index.json: model names must be unique and in string order .*"
                                              r"'c' comes before 'b' \(row 2\)"):
        WeightsDataset(tmp_path / "data")


def test_all_weights_pt_is_copied_memory_mapped(tmp_path):
    matrix = torch.randn(7, SMALL.numel)
    torch.save(matrix, tmp_path / "all_weights.pt")
    report = collect_all_weights(tmp_path / "all_weights.pt", tmp_path / "data", SMALL, shard_size=3)
    assert report.dataset.names == tuple(f"{i}" for i in range(7))
    assert torch.equal(report.dataset.read_rows(0, 7), matrix)
    with pytest.raises(FileFormatError, match="'c' comes before 'b'"):
        collect_all_weights(tmp_path / "all_weights.pt", tmp_path / "d2", SMALL, names=["a", "c", "b"] + list("defg"))
    with pytest.raises(FileFormatError, match="7 rows but 2 model names"):
        collect_all_weights(tmp_path / "all_weights.pt", tmp_path / "d2", SMALL, names=["a", "b"])
    matrix[3, 2] = float("inf")
    torch.save(matrix, tmp_path / "bad.pt")
    with pytest.raises(SpaceError, match=r"model '3' \(row 3 of .*bad.pt\)"):
        collect_all_weights(tmp_path / "bad.pt", tmp_path / "d3", SMALL)
    with pytest.raises(LayoutError, match="22 numbers per model, the layout has N = 99,648"):
        collect_all_weights(tmp_path / "all_weights.pt", tmp_path / "d4")


def test_cli_collect_and_export_a_dataset_model(tmp_path, capsys):
    weights = write_loras(tmp_path / "runs", ["id1", "id0", "id2"])
    assert main(["collect", str(tmp_path / "runs"), str(tmp_path / "data"), "--shard-size", "2"]) == 0
    assert "added 3 models" in capsys.readouterr().out
    for key, name in (("id2", "id2"), ("0", "id0"), ("-2", "id1")):
        assert main(["export", "--dataset", str(tmp_path / "data"), "--dataset-model", key, "--format", "kohya",
                     "--out", str(tmp_path / f"{key}.safetensors")]) == 0
        assert torch.equal(load_kohya(SMALL, tmp_path / f"{key}.safetensors"), weights[name])
    assert main(["export", "--dataset", str(tmp_path / "data"), "--dataset-model", "id1", "--out",
                 str(tmp_path / "peft")]) == 0
    assert torch.equal(load_peft(SMALL, tmp_path / "peft"), weights["id1"])

    matrix = torch.randn(3, SMALL.numel)
    torch.save(matrix, tmp_path / "all.pt")
    (tmp_path / "names.txt").write_text("p\nq\nr\n")
    assert main(["collect", "--from-all-weights", str(tmp_path / "all.pt"), str(tmp_path / "d2"), "--names",
                 str(tmp_path / "names.txt"), "--layout-from", str(tmp_path / "runs" / "id0")]) == 0
    assert torch.equal(WeightsDataset(tmp_path / "d2")["q"], matrix[1])
    assert main(["collect", str(tmp_path / "runs"), str(tmp_path / "d3"), "--dtype", "float16"]) == 0
    assert torch.equal(WeightsDataset(tmp_path / "d3")["id2"], weights["id2"].half().float())

    cases = [
        (["collect", tmp_path / "nowhere", tmp_path / "d"], "nowhere: no such folder"),
        (["collect", tmp_path / "d"], "either LORA_ROOT OUT or --from-all-weights"),
        (["export", "--dataset", tmp_path / "data", "--dataset-model", "nobody", "--out", tmp_path / "o"],
         "no model named 'nobody'"),
        (["export", "--dataset", tmp_path / "data", "--out", tmp_path / "o"],
         "--dataset and --dataset-model go together"),
    ]
    capsys.readouterr()
    for args, message in cases:
        with pytest.raises(SystemExit) as exit:
            main([str(arg) for arg in args])
        err = capsys.readouterr().err
        assert exit.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)


def test_a_float16_dataset_holds_the_rounded_weights_in_half_the_bytes(tmp_path):
    names = [f"m{i:02d}" for i in range(7)]
    weights = write_loras(tmp_path / "runs", names)
    single = collect_folders(tmp_path / "runs", tmp_path / "f32", shard_size=3).dataset
    half = collect_folders(tmp_path / "runs", tmp_path / "f16", shard_size=3, dtype="float16").dataset
    rounded = torch.stack([weights[name] for name in names]).half().float()            # (M, N)
    assert half.dtype_name == "float16" and "float16 shards" in repr(half)
    assert torch.equal(half.read_rows(0, 7), rounded) and not torch.equal(single.read_rows(0, 7), rounded)
    assert torch.equal(half.read_rows(2, 5, out=torch.empty(3, SMALL.numel)), rounded[2:5])  # across shards
    assert torch.equal(half.read_block(1, 6, 4, 19), rounded[1:6, 4:19])
    assert torch.equal(half["m06"], rounded[6])
    data = {d.name: sum(p.stat().st_size - read_safetensors_header(p)[1] for p in d.glob("weights-*"))
            for d in (tmp_path / "f32", tmp_path / "f16")}                          # bytes after the headers
    assert data == {"f32": 4 * 7 * SMALL.numel, "f16": 2 * 7 * SMALL.numel}

    weights |= write_loras(tmp_path / "runs", ["m07", "a0"], seed=1)   # added rows keep the dataset's dtype
    grown = collect_folders(tmp_path / "runs", tmp_path / "f16").dataset
    assert grown.dtype_name == "float16" and grown.names[0] == "a0"
    assert torch.equal(grown.read_rows(0, 9), torch.stack([weights[n] for n in grown.names]).half().float())

    index = json.loads((tmp_path / "f16" / INDEX_JSON).read_text())
    (tmp_path / "f16" / INDEX_JSON).write_text(json.dumps(index | {"dtype": "float32"}))
    with pytest.raises(FileFormatError, match="is F16 .* the index expects F32"):
        WeightsDataset(tmp_path / "f16")
    (tmp_path / "f16" / INDEX_JSON).write_text(json.dumps(index | {"dtype": "int8"}))
    with pytest.raises(FileFormatError, match="dtype is 'int8'; expected one of float32, float16"):
        WeightsDataset(tmp_path / "f16")
    with pytest.raises(W2WError, match="dtype 'bfloat16': expected one of float32, float16"):
        collect_folders(tmp_path / "runs", tmp_path / "other", dtype="bfloat16")
