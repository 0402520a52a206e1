import base64
import gzip
import json
from pathlib import Path

import pytest
from PIL import Image

from aloe_cli.data.images import load_image
from aloe_cli.data.io import RecordWriter, read_items
from aloe_cli.errors import AloeError
from support import aloe, chat, jpeg_bytes, read_jsonl, scan, write_jsonl


def records_of(items):
    return [item.record for item in items]


def test_jsonl_and_gzip_read_identically(tmp_path):
    records = [chat(f"q{i}", f"a{i}", id=str(i)) for i in range(5)]
    plain = write_jsonl(tmp_path / "a.jsonl", records)
    zipped = tmp_path / "a.jsonl.gz"
    zipped.write_bytes(gzip.compress(plain.read_bytes()))
    expected = [{**record, "source": "a"} for record in records]  # records without a source get the file's name
    assert records_of(read_items([str(plain)])) == expected
    assert records_of(read_items([str(zipped)])) == expected


def test_jsonl_errors_are_items_with_line_numbers(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(chat("q", "a")) + "\n{not json\n\n" + json.dumps({"no": "messages"}) + "\n")
    items = list(read_items([str(path)]))
    assert [i.error is None for i in items] == [True, False, False]
    assert items[1].error.reason == "invalid_json" and items[1].where.endswith("bad.jsonl:2")
    assert items[2].error.reason == "missing_field" and items[2].where.endswith("bad.jsonl:4")


def test_globs_missing_inputs_and_unknown_formats(tmp_path):
    for name in ("a.jsonl", "b.jsonl"):
        write_jsonl(tmp_path / name, [chat("q", name)])
    assert len(list(read_items([str(tmp_path / "*.jsonl")]))) == 2
    with pytest.raises(AloeError, match="matches no file"):
        list(read_items([str(tmp_path / "*.parquet")]))
    with pytest.raises(AloeError, match="input not found"):
        list(read_items([str(tmp_path / "nope.jsonl")]))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(AloeError, match="unknown input format"):
        list(read_items([str(tmp_path / "x.csv")]))


def test_relative_images_resolve_against_the_input_folder(tmp_path):
    (tmp_path / "imgs").mkdir()
    scan(1).save(tmp_path / "imgs" / "x.png")
    write_jsonl(tmp_path / "d.jsonl", [chat("q", "a", ["imgs/x.png"])])
    item = next(read_items([str(tmp_path / "d.jsonl")]))
    assert load_image(item.record["images"][0], item.image_root).size == (128, 128)


def test_parquet_round_trip_with_embedded_image_bytes(tmp_path):
    png = tmp_path / "x.png"
    scan(2).save(png)
    records = [chat("q", "a", ["data:image/jpeg;base64," + base64.b64encode(jpeg_bytes(scan(3))).decode()], id="1"),
               chat("q2", "a2", [str(png)], id="2", aloe={"score": {"value": 4}}),
               chat("text only", "yes", id="3")]
    out = tmp_path / "out.parquet"
    with RecordWriter(out) as writer:
        for record in records:
            writer.write(record)
    back = records_of(read_items([str(out)]))
    assert [r["id"] for r in back] == ["1", "2", "3"]
    assert back[0]["images"][0]["bytes"][:2] == b"\xff\xd8"  # HF Image struct {bytes, path}
    assert back[1]["images"][0]["path"] == str(png) and back[1]["aloe"]["score"]["value"] == 4
    assert back[2]["images"] == []
    assert load_image(back[0]["images"][0]).size == (128, 128)
    # and back to JSONL, bytes become data URIs
    out_jsonl = tmp_path / "again.jsonl"
    with RecordWriter(out_jsonl) as writer:
        writer.write(back[0])
    assert read_jsonl(out_jsonl)[0]["images"][0].startswith("data:image/jpeg;base64,")


def test_hf_dataset_folder_with_image_feature(tmp_path):
    datasets = pytest.importorskip("datasets")
    images = [scan(i) for i in range(3)]
    ds = datasets.Dataset.from_dict({
        "messages": [chat("q", f"a{i}", ["x"])["messages"] for i in range(3)],
        "images": [[image] for image in images],
        "source": ["s"] * 3,
    }).cast_column("images", datasets.Sequence(datasets.Image()))
    ds.save_to_disk(str(tmp_path / "ds"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "dd"))
    back = records_of(read_items([str(tmp_path / "ds")]))
    assert [r["messages"][1]["content"][0]["text"] for r in back] == ["a0", "a1", "a2"]
    assert load_image(back[1]["images"][0]).size == (128, 128)
    assert len(list(read_items([str(tmp_path / "dd")]))) == 4
    (tmp_path / "plain_folder").mkdir()  # no saved dataset and no data files: load_dataset finds nothing
    with pytest.raises(AloeError, match="cannot load dataset folder .*plain_folder"):
        list(read_items([str(tmp_path / "plain_folder")]))


def dataset_repository(folder, datasets, splits: dict[str, int]):
    """A dataset repository folder as the Hub serves one (data/<split>-00000-of-00001.parquet), in TRL's
    conversational vision schema with an Image feature, like HuggingFaceH4/llava-instruct-mix-vsft."""
    (folder / "data").mkdir(parents=True)
    for split, count in splits.items():
        ds = datasets.Dataset.from_dict({
            "messages": [chat("What is shown?", f"{split} {i}", ["x"])["messages"] for i in range(count)],
            "images": [[scan(i, size=64)] for i in range(count)],
        }).cast_column("images", datasets.Sequence(datasets.Image()))
        ds.to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return folder


def cache_as_hub_dataset(repo, repo_id: str, hf_home, datasets):
    """Put `repo` into the datasets cache under HF_HOME as if `load_dataset(repo_id)` had downloaded it, so it
    reads with HF_DATASETS_OFFLINE=1 (the machine that trains often has no network)."""
    import shutil

    loaded = datasets.load_dataset(str(repo), cache_dir=str(hf_home / "datasets"))
    cached = Path(next(iter(loaded.values())).cache_files[0]["filename"]).parent
    namespace, name = repo_id.split("/")
    target = hf_home / "datasets" / f"{namespace}___{name}" / "default" / "0.0.0" / cached.name
    shutil.copytree(cached, target)
    for arrow in target.glob(f"{repo.name}-*.arrow"):
        arrow.rename(target / arrow.name.replace(repo.name, name, 1))


def test_hub_dataset_ids_and_repository_folders_are_read_through_load_dataset(tmp_path):
    """-i ORG/NAME[:SPLIT] and a dataset repository folder: the train split unless one is named; offline, from the
    cache; an id that is not cached is one line naming it; a missing file path stays "not found"."""
    datasets = pytest.importorskip("datasets")
    repo = dataset_repository(tmp_path / "llava-instruct-mix-vsft", datasets, {"train": 3, "test": 2})
    home = tmp_path / "hf_home"
    cache_as_hub_dataset(repo, "HuggingFaceH4/llava-instruct-mix-vsft", home, datasets)
    env = {"HF_HOME": str(home), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    for reference, answers in ((str(repo), ["train 0", "train 1", "train 2"]),
                               ("HuggingFaceH4/llava-instruct-mix-vsft", ["train 0", "train 1", "train 2"]),
                               ("HuggingFaceH4/llava-instruct-mix-vsft:test", ["test 0", "test 1"])):
        proc = aloe("dedup", "--within", "--max-distance", "0", "-i", reference, "--keep-all", env=env)
        assert proc.returncode == 0, proc.stderr
        back = read_jsonl(proc.stdout)
        assert [r["messages"][1]["content"][0]["text"] for r in back] == answers, reference
        assert load_image(back[0]["images"][0]).size == (64, 64)
        assert "Using the latest cached version" not in proc.stderr  # datasets' own chatter stays quiet
    proc = aloe("dedup", "--within", "-i", "HuggingFaceH4/not-cached", env=env)
    assert proc.returncode == 1 and proc.stderr.strip().splitlines() == [
        "aloe: error: cannot load Hub dataset HuggingFaceH4/not-cached (HF_DATASETS_OFFLINE is set and it is not in "
        "the cache): ConnectionError: Couldn't reach 'HuggingFaceH4/not-cached' on the Hub (OfflineModeIsEnabled)"]
    proc = aloe("dedup", "--within", "-i", "HuggingFaceH4/llava-instruct-mix-vsft:validation", env=env)
    assert proc.returncode == 1 and proc.stderr.strip().endswith("no split 'validation' (it has train, test)")
    proc = aloe("dedup", "--within", "-i", "data/train.jsonl", env=env)  # a path, not an id: never sent to the Hub
    assert proc.returncode == 1 and proc.stderr.strip() == "aloe: error: input not found: data/train.jsonl"


def write_tsv(path, header, rows):
    path.write_text("\t".join(header) + "\n" + "".join("\t".join(map(str, r)) + "\n" for r in rows))
    return path


def test_vlmevalkit_tsv_base64_references_options_and_image_path(tmp_path):
    b64 = base64.b64encode(jpeg_bytes(scan(5))).decode()
    scan(6).save(tmp_path / "p.png")
    tsv = write_tsv(tmp_path / "bench.tsv", ["index", "image", "question", "A", "B", "C", "answer", "category"], [
        [0, b64, "Abnormal?", "yes", "no", "nan", "A", "cls"],
        [1, "0", "Which side?", "left", "right", "", "B", "side"],  # refers to row 0's image
        [2, str([b64, b64]), "Same image twice?", "yes", "no", "", "A", "multi"],
    ])
    items = list(read_items([str(tsv)]))
    assert all(item.error is None for item in items)
    first, second, third = (item.record for item in items)
    assert first["id"] == "0" and first["source"] == "bench"
    assert first["images"][0].startswith("data:image/jpeg;base64,")
    assert second["images"] == first["images"]
    assert len(third["images"]) == 2
    assert first["messages"][0]["content"][-1]["text"] == "Abnormal?\nOptions:\nA. yes\nB. no"
    assert first["meta"]["options"] == {"A": "yes", "B": "no"} and first["meta"]["category"] == "cls"
    assert first["messages"][1]["content"][0]["text"] == "A"
    assert load_image(first["images"][0]).size == (128, 128)
    path_tsv = write_tsv(tmp_path / "paths.tsv", ["index", "image_path", "question"], [[7, "p.png", "What?"]])
    record = next(read_items([str(path_tsv)])).record
    assert record["images"] == ["p.png"]


def test_tsv_missing_columns_and_dangling_reference(tmp_path):
    tsv = write_tsv(tmp_path / "nocol.tsv", ["index", "image"], [[0, "abc"]])
    with pytest.raises(AloeError, match=r"nocol.tsv.*missing column\(s\): question"):
        list(read_items([str(tsv)]))
    dangling = write_tsv(tmp_path / "dangling.tsv", ["index", "image", "question"], [[0, "9", "q"]])
    item = next(read_items([str(dangling)]))
    assert item.error.reason == "image_missing" and item.where.endswith("dangling.tsv:2")


def test_writer_is_atomic(tmp_path):
    out = tmp_path / "out.jsonl"
    with pytest.raises(RuntimeError):
        with RecordWriter(out) as writer:
            writer.write(chat("q", "a"))
            raise RuntimeError("boom")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        with RecordWriter(tmp_path / "out.parquet") as writer:  # parquet spools first: both temp files go
            writer.write(chat("q", "a"))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []
    with RecordWriter(tmp_path / "out.jsonl.gz") as writer:
        writer.write(chat("q", "a"))
    assert json.loads(gzip.decompress((tmp_path / "out.jsonl.gz").read_bytes()))["messages"][1]["role"] == "assistant"
    with pytest.raises(AloeError, match="unknown output format"):
        RecordWriter(tmp_path / "out.csv")
    with pytest.raises(AloeError, match="output folder does not exist"):
        RecordWriter(tmp_path / "nope" / "out.jsonl").__enter__()


def test_atomic_files_get_the_usual_mode_and_replace_the_old_one_only_on_success(tmp_path):
    import os

    from aloe_cli.data.io import atomic_path, write_atomic

    target = tmp_path / "report.json"
    write_atomic(target, b"old")
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask  # not the private mode of a temp file
    with pytest.raises(OSError):
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as handle:
                handle.write(b"half")
            raise OSError("disk full")
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["report.json"]
    with pytest.raises(AloeError, match="output folder does not exist"):
        write_atomic(tmp_path / "nope" / "x.json", b"")


def test_parquet_unifies_schemas_across_chunks(tmp_path):
    out = tmp_path / "mixed.parquet"
    with RecordWriter(out) as writer:
        for i in range(5000):
            extra = {"aloe": {"score": {"value": i % 5}}} if i > 4000 else {}
            writer.write(chat(f"q{i}", "a", id=str(i), **extra))
    back = records_of(read_items([str(out)]))
    assert len(back) == 5000 and back[4500]["aloe"]["score"]["value"] == 0 and back[0].get("aloe") is None
    assert Image  # PIL imported for the helpers


# ----------------------------------------------------------------------------- shards

def _write_parquet(path, records, row_group_size):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size)
    return path


@pytest.fixture(scope="module")
def every_format(tmp_path_factory):
    """One input of each format (name -> path), with blank and unparseable lines where a format has lines."""
    datasets = pytest.importorskip("datasets")
    folder = tmp_path_factory.mktemp("formats")

    def records(prefix, n):
        return [chat(f"{prefix} q{i}", f"a{i}", id=f"{prefix}-{i}", source=prefix) for i in range(n)]

    lines = [json.dumps(r) for r in records("jsonl", 9)]
    lines[4:4] = ["", "{not json"]  # a blank line (not a record) and a bad one (an error item)
    (folder / "a.jsonl").write_text("\n".join(lines) + "\n")
    # no newline after the last line
    (folder / "b.jsonl.gz").write_bytes(gzip.compress("\n".join(json.dumps(r) for r in records("gz", 7)).encode()))
    # 23 rows in 5 row groups, and 4 rows in a single group
    _write_parquet(folder / "c.parquet", records("pq", 23), row_group_size=5)
    _write_parquet(folder / "d.parquet", records("pq1", 4), row_group_size=100)
    table = records("ds", 6)
    datasets.Dataset.from_list(table).save_to_disk(str(folder / "ds"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(records("dd", 3)),
                          "test": datasets.Dataset.from_list(records("dt", 2))}).save_to_disk(str(folder / "dd"))
    write_tsv(folder / "e.tsv", ["index", "question", "answer"], [[i, f"tsv q{i}", "yes"] for i in range(5)])
    return {name: str(folder / name) for name in ("a.jsonl", "b.jsonl.gz", "c.parquet", "d.parquet", "ds", "dd",
                                                 "e.tsv")}


def shard_keys(paths, shard=None):
    from aloe_cli.data.shard import Shard

    items = read_items(paths, shard=shard or Shard())
    return [(item.where, json.dumps(item.record if item.error is None else item.raw, sort_keys=True))
            for item in items]


@pytest.mark.parametrize("count", [1, 2, 3, 7, 40])
@pytest.mark.parametrize("name", ["a.jsonl", "b.jsonl.gz", "c.parquet", "d.parquet", "ds", "dd", "e.tsv", "all"])
def test_the_shards_of_every_format_cover_the_input_exactly_once(every_format, name, count):
    from aloe_cli.data.shard import Shard

    paths = list(every_format.values()) if name == "all" else [every_format[name]]
    whole = shard_keys(paths)
    shards = [shard_keys(paths, Shard(k, count)) for k in range(count)]
    union = [key for shard in shards for key in shard]
    assert sorted(union) == sorted(whole) and len(union) == len(whole)  # every record once, none twice
    position = {key: i for i, key in enumerate(whole)}
    for shard in shards:  # each shard keeps the input order
        assert [position[key] for key in shard] == sorted(position[key] for key in shard)
    if 2 * count <= len(whole):
        assert all(shards)  # nothing starves while there is enough to share


def test_sharded_lines_across_read_blocks(tmp_path):
    from aloe_cli.data.shard import Shard

    path = write_jsonl(tmp_path / "big.jsonl", [chat(f"q{i} " + "x" * 700, "a", id=str(i)) for i in range(3000)])
    assert path.stat().st_size > 2 * (1 << 20)  # read in 1 MiB blocks: lines straddle block ends
    whole = shard_keys([str(path)])
    shards = [shard_keys([str(path)], Shard(k, 3)) for k in range(3)]
    assert sorted(key for shard in shards for key in shard) == sorted(whole)
    for shard in shards:  # a shard takes runs of consecutive lines (chunks of the file), ~32 of them
        numbers = [int(where.rsplit(":", 1)[1]) for where, _ in shard]
        runs = 1 + sum(b != a + 1 for a, b in zip(numbers, numbers[1:]))
        assert 800 <= len(numbers) <= 1200 and 16 <= runs <= 48


def test_shards_take_whole_files_row_groups_or_lines(every_format):
    from aloe_cli.data.shard import Shard

    everything = list(every_format.values())  # 7 inputs
    by_file = {item.input.rstrip("/") for item in read_items(everything, shard=Shard(1, 3))}
    assert by_file == {every_format["b.jsonl.gz"], every_format["ds"]}  # files 1 and 4 of 0..6
    groups = [int(item.where.rsplit(" ", 1)[1]) for item in read_items([every_format["c.parquet"]],
                                                                      shard=Shard(0, 2))]
    assert groups == [0, 1, 2, 3, 4, 10, 11, 12, 13, 14, 20, 21, 22]  # row groups 0, 2 and 4, whole
    rows = [int(item.where.rsplit(" ", 1)[1]) for item in read_items([every_format["c.parquet"]],
                                                                    shard=Shard(1, 7))]
    assert rows == [1, 8, 15, 22]  # more shards than row groups: rows inside them
    shards = [list(read_items([every_format["a.jsonl"]], shard=Shard(k, 2))) for k in range(2)]
    numbers = sorted(int(item.where.rsplit(":", 1)[1]) for shard in shards for item in shard)
    assert numbers == [1, 2, 3, 4, 6, 7, 8, 9, 10, 11]  # the file's own line numbers; line 5 is blank
    assert [(item.where.rsplit(":", 1)[1], item.error.reason) for shard in shards for item in shard
            if item.error] == [("6", "invalid_json")]  # read (and reported) by exactly one shard


def test_dataset_folders_are_read_through_datasets_with_images_undecoded(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"messages": [chat("q", "a", ["x"])["messages"]], "images": [[scan(7)]]})
    ds.cast_column("images", datasets.Sequence(datasets.Image())).save_to_disk(str(tmp_path / "ds"))
    item = next(read_items([str(tmp_path / "ds")]))
    image = item.record["images"][0]
    assert set(image) == {"bytes", "path"} and image["bytes"][:4] == b"\x89PNG"  # the stored struct, not a PIL image
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "state.json").write_text("{}")
    with pytest.raises(AloeError, match="broken: unreadable dataset folder"):
        list(read_items([str(tmp_path / "broken")]))
