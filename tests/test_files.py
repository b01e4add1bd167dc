"""How files are written (`tokenformer.files`): atomically, and with the user's umask like any file
`open()` creates (a teammate on a shared machine can read a checkpoint when the umask lets them)."""

import os
import stat

import pytest

from tokenformer import ByteTokenizer, Config, TokenFormer
from tokenformer.files import atomic_write_text, current_umask


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "a.txt", "x")
        TokenFormer(Config.from_name("tiny")).save_pretrained(tmp_path / "m", tokenizer=ByteTokenizer())
        with open(tmp_path / "plain.txt", "w") as f:  # what the user's own programs would make
            f.write("x")
        assert current_umask() == umask  # reading it left it as it was
    finally:
        os.umask(old)
    expected = stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode)
    assert expected == 0o666 & ~umask
    for path in [tmp_path / "a.txt", *sorted((tmp_path / "m").iterdir())]:
        assert stat.S_IMODE(path.stat().st_mode) == expected, path.name
