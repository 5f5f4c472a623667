"""convert and calibrate under hostile or careless use: two writers of one target, wildcard
names, a full disk, an unwritable folder, kill -9 at any point, a crashing child.

Every case runs on a tiny Hugging Face folder (no llama.cpp): the fast tier. A full disk is
simulated (ENOSPC raised where the data is written), and so is an unwritable folder when the
tests run as root (root writes through chmod 0o555)."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from tiny_models import write_hf_folder

from flashinfer_ondevice.build import calibrate as calibrate_module
from flashinfer_ondevice.build import convert as convert_module
from flashinfer_ondevice.build.calibrate import calibrate
from flashinfer_ondevice.build.convert import convert, convert_in_child
from flashinfer_ondevice.cli import main
from flashinfer_ondevice.errors import FlashInferError
from flashinfer_ondevice.store import reader as reader_module
from flashinfer_ondevice.store.format import MANIFEST, UNFINISHED
from flashinfer_ondevice.store.lock import StoreBusyError, StoreWriteError, exclusive
from flashinfer_ondevice.store.reader import StoreError, is_store, open_store

TEXT = " ".join(["the quick brown fox jumps over the lazy dog and runs far away"] * 60)
RANK = 64  # the output-layer proxy's rank: the tiny model gets one, as a real model does
# store/reader.py refuses unfinished folders once it checks the marker (see the report)
READER_CHECKS_MARKER = hasattr(reader_module, "unfinished")
needs_reader_check = pytest.mark.xfail(
    not READER_CHECKS_MARKER, strict=True,
    reason="store/reader.py does not yet refuse folders holding the 'unfinished' marker")


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_hf_folder(tmp_path_factory.mktemp("hf") / "llama", "llama")


@pytest.fixture(scope="module")
def calibrated(source, tmp_path_factory) -> Path:
    path = convert(source, tmp_path_factory.mktemp("stores") / "c.store", head_proxy_rank=RANK)
    calibrate(path, TEXT, tokens=300)
    return path


@pytest.fixture
def store_copy(calibrated, tmp_path) -> Path:
    return Path(shutil.copytree(calibrated, tmp_path / "copy.store"))


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (relative name -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def names(folder: Path) -> set[str]:
    return set(os.listdir(folder))


def assert_never_half_made(parent: Path, target: Path) -> None:
    """`target` is absent or a whole store; a partial folder beside it is marked unfinished
    (never opened as a store) or, killed between its last two steps, whole."""
    if os.path.lexists(target):
        open_store(target, verify=True)
    for name in names(parent):
        path = parent / name
        if not name.startswith(f".{target.name}.partial-"):
            continue
        if (path / UNFINISHED).exists():
            if READER_CHECKS_MARKER:
                assert not is_store(path)
                with pytest.raises(StoreError, match="unfinished"):
                    open_store(path)
        elif (path / MANIFEST).exists():
            open_store(path, verify=True)  # complete: only the rename was left


# ---------------------------------------------------------------------------------------
# one writer per target

_CHILD = textwrap.dedent("""
    import os, signal, sys, time
    from pathlib import Path
    from flashinfer_ondevice.build import convert as c

    point, source, target, flags = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    def after(owner, name, nth, then=die):
        original, calls = getattr(owner, name), [0]
        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            calls[0] += 1
            if calls[0] == nth:
                then()
            return result
        setattr(owner, name, wrapper)

    def pause():
        (flags / "paused").touch()
        deadline = time.monotonic() + 120
        while not (flags / "go").exists() and time.monotonic() < deadline:
            time.sleep(0.02)

    if point == "weights":
        after(c._WeightsWriter, "put", 4)
    elif point == "proxy":
        after(c, "_add_head_proxy", 1)
    elif point == "synced":
        after(c, "_sync_files", 1)
    elif point == "marker":
        after(c, "finish_building", 1)
    elif point == "pause":
        after(c._WeightsWriter, "put", 2, pause)
    print("ready", flush=True)
    c.convert(source, target, "int8", head_proxy_rank=int(sys.argv[5]) or None)
""")


def start_child(tmp_path: Path, point: str, source: Path, target: Path,
                rank: int | None = None) -> subprocess.Popen:
    """A convert in a child process, killed at `point` (see _CHILD); once it is ready."""
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    flags = tmp_path / "flags"
    flags.mkdir(exist_ok=True)
    child = subprocess.Popen([sys.executable, str(script), point, str(source), str(target),
                              str(flags), str(rank or 0)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    return child


def wait_for(path: Path, child: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert child.poll() is None, "the child exited early"
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


def test_a_second_convert_of_a_target_fails_at_once_and_leaves_the_first_alone(
        source, tmp_path):
    out = tmp_path / "out"
    target = out / "s.store"
    first = start_child(tmp_path, "pause", source, target)
    try:
        wait_for(tmp_path / "flags" / "paused", first)
        partial = out / f".s.store.partial-{first.pid}"
        before = snapshot(partial)
        started = time.monotonic()
        with pytest.raises(StoreBusyError, match=rf"pid {first.pid}\) is converting into"):
            convert(source, target)
        assert time.monotonic() - started < 5  # at once: no waiting, no conversion
        with pytest.raises(StoreBusyError, match=f"pid {first.pid}"):  # from a child too
            convert_in_child(source, target, "int8", False)
        assert snapshot(partial) == before  # its partial folder untouched
        assert not target.exists()
        (tmp_path / "flags" / "go").touch()
        assert first.wait(timeout=120) == 0
    finally:
        first.kill()
        first.wait()
    open_store(target, verify=True)
    assert names(out) == {"s.store"}  # no partial folder, no lock file


def test_a_held_lock_refuses_convert_and_calibrate_and_keeps_their_files(
        source, store_copy, tmp_path):
    target = tmp_path / "t.store"
    live = tmp_path / f".t.store.partial-{os.getpid()}"  # as if this process converted
    live.mkdir()
    (live / UNFINISHED).write_text("busy")
    with exclusive(tmp_path / ".t.store.lock", "converting into t.store", target), \
            pytest.raises(StoreBusyError, match=f"pid {os.getpid()}"):
        convert(source, target)
    assert (live / UNFINISHED).read_text() == "busy"

    before = snapshot(store_copy)
    with exclusive(store_copy / calibrate_module.LOCK, f"calibrating {store_copy}",
                   store_copy), \
            pytest.raises(StoreBusyError, match=rf"\(pid {os.getpid()}\) is calibrating"):
        calibrate(store_copy, TEXT, tokens=300)
    assert snapshot(store_copy) == before
    result = CliRunner().invoke(main, ["convert", str(source), "-o", str(target)])
    assert result.exit_code == 0, result.output  # the lock is free again: it converts


# ---------------------------------------------------------------------------------------
# names: a wildcard is a name; stale partial folders

def test_a_wildcard_output_name_touches_no_sibling(source, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("a.store", ".a.store.partial-12", ".b.partial-3", ".x.partial-99"):
        (out / name).mkdir()
        (out / name / "work").write_text(name)
    (out / ".a.store.lock").write_text("12\n")
    siblings = snapshot(out)
    (out / ".*.partial-77").mkdir()  # a stale partial folder of the target named "*"
    result = CliRunner().invoke(main, ["convert", str(source), "-o", str(out / "*")])
    assert result.exit_code == 0, result.output
    open_store(out / "*", verify=True)
    assert {k: v for k, v in snapshot(out).items() if not k.startswith("*/")} == siblings
    assert names(out) == {"*", "a.store", ".a.store.partial-12", ".b.partial-3",
                          ".x.partial-99", ".a.store.lock"}


def test_a_killed_converts_partial_folder_and_lock_are_removed_by_the_next(source, tmp_path):
    target = tmp_path / "s.store"
    dead = tmp_path / ".s.store.partial-4000000"  # no such pid; its lock is free
    dead.mkdir()
    (dead / UNFINISHED).write_text("killed")
    (dead / "weights.bin").write_bytes(b"\0" * 8192)
    (tmp_path / ".s.store.lock").write_text("4000000\n")
    look_alikes = {".s.store.partial-1.bak", ".s.store.partial-", ".s.store.partial-x",
                   ".s.store.partial-5.partial-6", ".s.stor.partial-7"}
    for name in look_alikes:
        (tmp_path / name).mkdir()
    convert(source, target)
    assert names(tmp_path) == {"s.store"} | look_alikes
    open_store(target, verify=True)


def test_a_file_in_the_way_of_the_output_folder_is_one_line(source, tmp_path):
    (tmp_path / "file").write_text("mine")
    for target in (tmp_path / "file" / "s", tmp_path / "file" / "a" / "s"):
        with pytest.raises(FlashInferError, match="a file is in the way"):
            convert(source, target)
    assert names(tmp_path) == {"file"}


# ---------------------------------------------------------------------------------------
# a full disk

class _FullDisk:
    """A file object that takes `room` bytes, then raises ENOSPC."""

    def __init__(self, file, room: int):
        self.file, self.room = file, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.file.write(data)

    def __getattr__(self, name):
        return getattr(self.file, name)


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fill_disk(monkeypatch, point: str) -> None:
    if point == "weights":
        original = convert_module._WeightsWriter.__init__

        def init(self, path, bar):
            original(self, path, bar)
            self.file = _FullDisk(self.file, 20000)

        monkeypatch.setattr(convert_module._WeightsWriter, "__init__", init)
    elif point == "tokenizer":
        monkeypatch.setattr(convert_module.shutil, "copyfile", _enospc)
    elif point == "manifest":
        monkeypatch.setattr(convert_module, "write_manifest", _enospc)
    elif point == "proxy":
        monkeypatch.setattr(convert_module.head_proxy, "write", _enospc)
    elif point == "sync":
        monkeypatch.setattr(convert_module, "_sync_files", _enospc)


@pytest.mark.parametrize("point", ["weights", "tokenizer", "manifest", "proxy", "sync"])
def test_a_full_disk_during_convert_is_one_line_and_leaves_nothing(source, tmp_path,
                                                                   monkeypatch, point):
    _fill_disk(monkeypatch, point)
    target = tmp_path / "new" / "deeper" / "s.store"
    with pytest.raises(StoreWriteError,
                       match=rf"^no space left on device writing {re.escape(str(target))}: "
                             r"(about [\d.]+ MB needed, )?[\d.]+ MB free$"):
        convert(source, target, head_proxy_rank=RANK if point == "proxy" else None)
    assert names(tmp_path) == set()  # no partial, no lock file, not even the new folders


def test_a_full_disk_is_one_line_from_the_command(source, tmp_path, monkeypatch):
    _fill_disk(monkeypatch, "weights")
    result = CliRunner().invoke(main, ["convert", str(source), "-o", str(tmp_path / "s")])
    assert result.exit_code == 1
    assert result.output.startswith("Error: no space left on device writing")
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert names(tmp_path) == set()


def test_a_full_disk_during_calibrate_keeps_the_old_calibration(store_copy, monkeypatch):
    before = snapshot(store_copy)
    monkeypatch.setattr(calibrate_module.os, "posix_fallocate", _enospc)  # scratch files
    with pytest.raises(StoreWriteError, match=r"^no space left on device writing .*: "
                                              r"(about [\d.]+ MB needed, )?[\d.]+ MB free$"):
        calibrate(store_copy, TEXT, tokens=300)
    assert snapshot(store_copy) == before
    monkeypatch.undo()

    original = calibrate_module.write_predictors

    def half_written(path, layers):  # sparsity.bin.partial: some bytes, then a full disk
        original(path, layers)
        with open(path, "r+b") as f:
            f.truncate(100)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(calibrate_module, "write_predictors", half_written)
    with pytest.raises(StoreWriteError, match="no space left on device"):
        calibrate(store_copy, TEXT, tokens=300)
    assert snapshot(store_copy) == before
    monkeypatch.undo()

    original_stage, calls = calibrate_module.stage_manifest, []

    def stage(folder, manifest, name):  # the disk fills up at the second manifest
        calls.append(name)
        if len(calls) == 2:
            _enospc()
        return original_stage(folder, manifest, name)

    monkeypatch.setattr(calibrate_module, "stage_manifest", stage)
    with pytest.raises(StoreWriteError, match="no space left on device"):
        calibrate(store_copy, TEXT, tokens=300)
    assert calls == ["uncalibrated", "calibrated"]
    assert snapshot(store_copy) == before
    assert open_store(store_copy, verify=True).sparsity is not None


# ---------------------------------------------------------------------------------------
# an unwritable folder

def _make_unwritable(folder: Path, monkeypatch, code: int) -> None:
    """chmod 0o555 `folder`; as root (whom chmod does not stop), and for EROFS, raise
    `code` from every call that would create or write a file under it."""
    folder.chmod(0o555)
    if os.geteuid() != 0 and code == errno.EACCES:
        return
    inside = str(folder.resolve()) + os.sep
    real_open, real_mkdir = os.open, os.mkdir

    def refuse(path):
        if os.path.abspath(path).startswith(inside):
            raise OSError(code, os.strerror(code), os.fspath(path))

    def guarded_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            refuse(path)
        return real_open(path, flags, *args, **kwargs)

    def guarded_mkdir(path, *args, **kwargs):
        refuse(path)
        return real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", guarded_open)
    monkeypatch.setattr(os, "mkdir", guarded_mkdir)


@pytest.mark.parametrize("code, reason", [(errno.EACCES, "permission denied"),
                                          (errno.EROFS, "read-only file system")])
def test_an_unwritable_output_folder_or_store_is_one_line(source, store_copy, tmp_path,
                                                          monkeypatch, code, reason):
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(store_copy)
    try:
        _make_unwritable(out, monkeypatch, code)
        with pytest.raises(StoreWriteError,
                           match=f"^cannot write {re.escape(str(out / 's'))}: {reason}"):
            convert(source, out / "s")
        with pytest.raises(StoreWriteError, match=f"^cannot write {re.escape(str(out / 'a'))}"
                                                  f"/s: {reason} \\({re.escape(str(out))}\\)$"):
            convert(source, out / "a" / "s")  # a folder it cannot create
        monkeypatch.undo()
        _make_unwritable(store_copy, monkeypatch, code)
        with pytest.raises(StoreWriteError,
                           match=f"^cannot write {re.escape(str(store_copy))}: {reason}$"):
            calibrate(store_copy, TEXT, tokens=300)
    finally:
        monkeypatch.undo()
        out.chmod(0o755)
        store_copy.chmod(0o755)
    assert names(out) == set()
    assert snapshot(store_copy) == before


# ---------------------------------------------------------------------------------------
# a partial folder is never a store; kill -9 at any point

@needs_reader_check
def test_a_partial_folder_never_opens_as_a_store(source, tmp_path, monkeypatch):
    """The partial folder just before its marker goes: every file written, the manifest
    whole, and still refused (only the convert writing it opens it)."""
    copy = tmp_path / "copy"

    def stop(folder):
        shutil.copytree(folder, copy)
        raise KeyboardInterrupt

    monkeypatch.setattr(convert_module, "finish_building", stop)
    with pytest.raises(KeyboardInterrupt):
        convert(source, tmp_path / "s", head_proxy_rank=RANK)
    assert (copy / UNFINISHED).exists() and (copy / MANIFEST).exists()
    assert not is_store(copy)
    with pytest.raises(StoreError, match="unfinished"):
        open_store(copy)
    assert names(tmp_path) == {"copy"}


def wait_or_kill(child: subprocess.Popen, delay: float | None) -> int:
    """The child's exit status: it kills itself at its point, or is killed after `delay`
    seconds; never left running."""
    try:
        if delay is not None:
            time.sleep(delay)
            child.send_signal(signal.SIGKILL)
        return child.wait(timeout=120)
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("point, delay", [
    ("weights", None), ("proxy", None), ("synced", None), ("marker", None),
    ("none", 0.05), ("none", 0.4)])
def test_kill_9_leaves_the_old_state_or_the_new_and_the_next_convert_succeeds(
        source, tmp_path, point, delay):
    out = tmp_path / "out"
    target = out / "s.store"
    rank = RANK if point in ("proxy", "marker") else None  # the proxy's fit takes a while
    code = wait_or_kill(start_child(tmp_path, point, source, target, rank), delay)
    # killed at its point (a timed kill may come after a quick convert ended)
    assert code == -signal.SIGKILL or (delay is not None and code == 0)
    assert_never_half_made(out, target)
    if not target.exists():
        convert(source, target)
    open_store(target, verify=True)
    assert names(out) == {"s.store"}


_CALIBRATE_CHILD = textwrap.dedent("""
    import os, signal, sys
    from flashinfer_ondevice.build import calibrate as k

    point, store, text = sys.argv[1], sys.argv[2], sys.argv[3]

    def after(owner, name, nth):
        original, calls = getattr(owner, name), [0]
        def wrapper(*args, **kwargs):
            result = original(*args, **kwargs)
            calls[0] += 1
            if calls[0] == nth:
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        setattr(owner, name, wrapper)

    if point == "scratch":
        after(k, "_scratch", 3)
    elif point.startswith("replace-"):
        after(os, "replace", int(point[len("replace-"):]))
    print("ready", flush=True)
    k.calibrate(store, text, tokens=300)
""")


@pytest.mark.parametrize("point, delay", [
    ("scratch", None), ("replace-1", None), ("replace-2", None), ("none", 0.1)])
def test_kill_9_during_calibrate_leaves_a_consistent_store(store_copy, tmp_path, point,
                                                           delay):
    before = names(store_copy)
    script = tmp_path / "calibrate_child.py"
    script.write_text(_CALIBRATE_CHILD)
    child = subprocess.Popen([sys.executable, str(script), point, str(store_copy), TEXT],
                             stdout=subprocess.PIPE, text=True)
    ready = child.stdout.readline().strip()  # the delay counts from here
    code = wait_or_kill(child, delay)
    assert ready == "ready"
    assert code == -signal.SIGKILL or (delay is not None and code == 0)
    store = open_store(store_copy, verify=True)  # every file it names whole
    if point == "replace-1":
        assert store.sparsity is None  # between the manifests: consistent, uncalibrated
    calibrate(store_copy, TEXT, tokens=300)  # and the next run cleans up after the killed one
    assert names(store_copy) == before
    assert open_store(store_copy, verify=True).sparsity is not None


# ---------------------------------------------------------------------------------------
# convert in a child: the child's own error line

_SITE = textwrap.dedent("""
    import os, sys
    from flashinfer_ondevice.build import convert as c

    def crash(*args, **kwargs):
        if os.environ["CRASH"] == "exception":
            raise RuntimeError("the real cause")
        if os.environ["CRASH"] == "full":
            def full(*args, **kwargs):
                raise OSError(28, "No space left on device")
            c.shutil.copyfile = full
            return original(*args, **kwargs)
        print("Traceback (most recent call last):", file=sys.stderr)
        print("MemoryError: the real cause", file=sys.stderr)
        print("some noise after it", flush=True)
        sys.stderr.flush()
        os._exit(3)

    original, c.convert = c.convert, crash
""")


@pytest.mark.parametrize("crash", ["exception", "exit", "full"])
def test_convert_in_child_reports_the_childs_error_line(source, tmp_path, monkeypatch, capfd,
                                                        crash):
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(_SITE)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(tmp_path / "site"), *filter(None, [os.environ.get("PYTHONPATH")])]))
    monkeypatch.setenv("CRASH", crash)
    expected, kind = {
        "exception": ("failed: RuntimeError: the real cause", FlashInferError),
        "exit": (r"failed \(exit status 3\): MemoryError: the real cause", FlashInferError),
        "full": ("^no space left on device writing", StoreWriteError)}[crash]
    with pytest.raises(kind, match=expected):
        convert_in_child(source, tmp_path / "out" / "s", "int8", False)
    err = capfd.readouterr().err
    if crash == "exit":
        assert "the real cause" in err  # its output reached our stderr
    if crash == "exception":  # a bug is one line; its traceback only with FLASHINFER_DEBUG
        assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_the_manifest_of_a_calibrated_store_names_only_whole_files(calibrated):
    manifest = json.loads((calibrated / MANIFEST).read_text())
    for name, info in manifest["files"].items():
        assert (calibrated / name).stat().st_size == info["size"]
    assert not {n for n in names(calibrated) if n.endswith(".partial") or n.startswith(".")}
