"""The count pass (member_names over a mapped shard) names the same members as the read pass
(tar_members), on the tar shapes the writers make and on damaged ones."""
import io
import tarfile

import pytest

from eclip.data.shardset import _count_keys
from eclip.data.tarmembers import DamagedTar, member_names, tar_members

LONG = "a" * 120 + "/sample"       # over ustar's 100 characters: a PAX path or a GNU long name


def _tar(fmt, names) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name in names:
            data = name.encode() * 3
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5      # a float mtime: webdataset's PAX header
            tar.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("dir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    return out.getvalue()


def _read_names(data: bytes) -> list:
    names = []
    try:
        for name, _, _, _ in tar_members(io.BytesIO(data), keep=lambda n: False, seekable=True):
            names.append(name)
    except DamagedTar:
        pass
    return names


NAMES = ["000.jpg", "000.txt", f"{LONG}.jpg", f"{LONG}.txt", "001.json"]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_count_pass_names_what_the_read_pass_reads(fmt):
    names = NAMES if fmt != tarfile.USTAR_FORMAT else NAMES[:2] + NAMES[-1:]
    data = _tar(fmt, names)
    assert list(member_names(data)) == _read_names(data) == names


def test_v7_headers_without_magic_are_counted_by_checksum():
    data = bytearray(_tar(tarfile.USTAR_FORMAT, ["000.jpg", "000.txt"]))
    for at in (0, 1024):           # blank each header's magic and version, then fix its checksum
        header = data[at:at + 512]
        header[257:265] = bytes(8)
        header[148:156] = b" " * 8
        header[148:156] = b"%06o\0 " % sum(header)
        data[at:at + 512] = header
    data = bytes(data)
    assert _read_names(data) == ["000.jpg", "000.txt"]
    assert list(member_names(data)) == ["000.jpg", "000.txt"]


@pytest.mark.parametrize("cut", [512 + 10, 1024 + 512 + 3, 2048 + 100])
def test_a_truncated_or_damaged_shard_counts_up_to_the_damage(cut, tmp_path):
    data = _tar(tarfile.USTAR_FORMAT, ["000.jpg", "000.txt", "001.jpg", "001.txt"])
    short = data[:cut]
    assert list(member_names(short)) == _read_names(short)
    damaged = bytearray(data)
    damaged[1024 + 257:1024 + 262] = b"xxxxx"      # the second header is no longer a tar header
    assert list(member_names(bytes(damaged))) == _read_names(bytes(damaged)) == ["000.jpg"]
    path = tmp_path / "s.tar"
    path.write_bytes(short)
    assert _count_keys(str(path)) == len({n.split(".")[0] for n in _read_names(short)})
    (tmp_path / "empty.tar").write_bytes(b"")
    assert _count_keys(str(tmp_path / "empty.tar")) == 0


@pytest.mark.parametrize("at", [0, 100, 124, 148, 257, 511])
def test_the_read_pass_finds_any_one_changed_header_byte(at):
    data = bytearray(_tar(tarfile.USTAR_FORMAT, ["000.jpg", "000.txt"]))
    data[1024 + at] = (data[1024 + at] + 1) % 256      # the second member's header
    with pytest.raises(DamagedTar):
        list(tar_members(io.BytesIO(bytes(data)), seekable=True))
