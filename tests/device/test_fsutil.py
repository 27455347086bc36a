"""StagedDir: the one way bundles, heads, engines and conversions reach their place (runtime/fsutil.py)."""
from __future__ import annotations

import contextlib
import stat

import pytest

from edgexfer.runtime.fsutil import StagedDir


def _tree(path):
    return {p.relative_to(path).as_posix(): p.read_text() for p in path.rglob("*") if p.is_file()}


def test_a_staged_directory_appears_whole_at_its_target_and_nothing_stays_beside_it(tmp_path):
    target = tmp_path / "heads" / "3"
    with StagedDir(target, private=True) as staged:
        assert staged.path.parent == target.parent and staged.path.name.startswith(".tmp-")
        assert stat.S_IMODE(staged.path.stat().st_mode) == 0o700
        (staged.path / "sub").mkdir()
        (staged.path / "sub" / "a.txt").write_text("a")
        assert not target.exists()  # nothing at the target before the block ends
    assert _tree(target) == {"sub/a.txt": "a"}
    assert [p.name for p in target.parent.iterdir()] == ["3"]


def test_a_failure_inside_the_block_leaves_the_target_as_it_was(tmp_path):
    target = tmp_path / "bundle"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="verify failed"):
        with StagedDir(target, name=".bundle.partial", replace=True) as staged:
            (staged.path / "new.txt").write_text("new")
            raise RuntimeError("verify failed")
    assert _tree(target) == {"old.txt": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_replace_puts_the_new_directory_where_the_old_one_was(tmp_path):
    target = tmp_path / "entry"
    target.mkdir()
    (target / "stale.txt").write_text("stale")
    (tmp_path / ".entry.partial").mkdir()  # what a killed run left under the same name: started afresh
    (tmp_path / ".entry.partial" / "leftover.txt").write_text("x")
    with StagedDir(target, name=".entry.partial", replace=True) as staged:
        assert not any(staged.path.iterdir())
        (staged.path / "fresh.txt").write_text("fresh")
    assert _tree(target) == {"fresh.txt": "fresh"}


def test_without_replace_an_existing_target_is_not_overwritten(tmp_path):
    target = tmp_path / "bundles" / "abc"
    target.mkdir(parents=True)
    (target / "kept.txt").write_text("kept")
    with pytest.raises(OSError):
        with StagedDir(target) as staged:
            (staged.path / "other.txt").write_text("other")
    assert _tree(target) == {"kept.txt": "kept"}
    assert [p.name for p in target.parent.iterdir()] == ["abc"]


@pytest.mark.parametrize("fails", [False, True])
def test_swap_keeps_the_old_directory_until_the_new_one_is_recorded(tmp_path, fails):
    root = tmp_path / "bundle"
    target = root / "engines" / "openvino" / "fp32"
    target.mkdir(parents=True)
    (target / "backbone.xml").write_text("old")
    with StagedDir(target, staging=root / ".convert-openvino-fp32.partial") as staged:
        (staged.path / "backbone.xml").write_text("new")
        with pytest.raises(RuntimeError) if fails else contextlib.nullcontext():
            with staged.swap() as placed:
                assert placed == target and _tree(target) == {"backbone.xml": "new"}
                assert _tree(target.with_name(".fp32.old")) == {"backbone.xml": "old"}  # kept meanwhile
                if fails:
                    raise RuntimeError("manifest write failed")
    assert _tree(target) == {"backbone.xml": "old" if fails else "new"}
    assert [p.name for p in target.parent.iterdir()] == ["fp32"]
    assert not (root / ".convert-openvino-fp32.partial").exists()

