"""Files written through a temp file and a rename get the permissions of a plain open()."""
import os
import stat

from utils.files import write_text_atomically


def test_atomic_writes_get_the_mode_of_a_plain_open(tmp_path):
    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    ours = write_text_atomically(tmp_path / "ours.json", "{}")
    assert stat.S_IMODE(os.stat(ours).st_mode) == stat.S_IMODE(os.stat(plain).st_mode)
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp file left
