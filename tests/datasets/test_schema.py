"""Where the files of one converted output are, and in which order every rank reads them."""

import pytest

from dqrm.datasets.schema import parquet_files


def test_single_file_wins_and_folders_are_read_nested_in_natural_order(tmp_path):
    names = ["train/day_10/part-00000.parquet", "train/day_2/part-00001.parquet", "train/day_2/part-00000.parquet",
             "train/day_1.parquet", "train/day_2/part-00010.parquet", "train/day_2/part-00002.parquet.partial",
             "train/notes.txt"]
    for n in names:
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / n).write_bytes(b"")
    got = [p.relative_to(tmp_path).as_posix() for p in parquet_files(tmp_path, "train")]
    assert got == ["train/day_1.parquet", "train/day_2/part-00000.parquet", "train/day_2/part-00001.parquet",
                   "train/day_2/part-00010.parquet", "train/day_10/part-00000.parquet"]
    (tmp_path / "train.parquet").write_bytes(b"")
    assert parquet_files(tmp_path, "train") == [tmp_path / "train.parquet"]
    with pytest.raises(FileNotFoundError, match="no val.parquet or val/"):
        parquet_files(tmp_path, "val")
