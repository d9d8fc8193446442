"""No temp file survives a completed run: a stage killed with kill -9 between writing its temps and renaming
them (markers, .idx, manifest.json, .nv-meta/, wdinfo.pkl), then run again to the end, leaves none; the temp
of a writer still alive (another Slurm slice) and a fresh one of another machine stay."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from typer.testing import CliRunner

from prep.cli import app
from prep.formats.atomic import STALE_TEMP_SECONDS, dead_writer, temp_name
from prep.formats.tar_write import write_shard

ROOT = Path(__file__).resolve().parents[1]

# the stage as it runs, except that every rename is a copy that leaves the temp where it was: as if killed
# between each write and its rename; then it waits to be killed
KILLED_AFTER_WRITING = textwrap.dedent("""
    import os, shutil, sys, time
    os.replace = lambda src, dst: shutil.copyfile(src, dst)
    from prep.cli import app
    try:
        app(sys.argv[1:], standalone_mode=False)
    finally:
        print("written", flush=True)
        time.sleep(600)
""")
LIVE_WRITER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from prep.formats.atomic import temp_name
    temp_name(Path(sys.argv[1])).write_bytes(b"half a shard")
    print("writing", flush=True)
    time.sleep(600)
""")


def temps(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if ".tmp-" in p.name}


def start(script: str, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE, env=env, text=True)
    proc.stdout.readline()  # it has written its temps
    return proc


def kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()


def test_rerun_after_kill_leaves_no_temp_but_spares_live_writers(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for s in range(3):
        write_shard(data / f"{s:06d}.tar", [(f"k{s}_{i}", {"txt": b"c"}) for i in range(4)], fsync=False)
    run = ["run", "generate_wdinfo", "--set", f"generate_wdinfo.input_dir={data}", "--quiet",
           *[a for s in ("download_parquet", "download_images", "reorganize_tar", "precache_encodings",
                         "merge_source_tar") for a in ("--set", f"{s}.enable=false")]]
    live = start(LIVE_WRITER, str(data / "000009.tar"))  # another slice, writing a shard right now
    try:
        live_temp = temps(data)
        assert len(live_temp) == 1
        killed = start(KILLED_AFTER_WRITING, *run)
        kill(killed)
        left = temps(data)
        for what in (".prep/done/generate_wdinfo/.0-000000.tar.json.tmp-", ".000000.tar.idx.tmp-",
                     ".manifest.json.tmp-", ".nv-meta/.split.yaml.tmp-", ".nv-meta/..info.json.tmp-",
                     ".wdinfo.pkl.tmp-"):
            assert any(t.startswith(what) for t in left), (what, left)
        elsewhere = data / ".manifest.json.tmp-00000000-12345-0123abcd"  # another machine's writer
        old = data / ".wdinfo.pkl.tmp-00000000-12346-0123abcd"
        for p in (elsewhere, old):
            p.write_bytes(b"x")
        os.utime(old, (time.time() - STALE_TEMP_SECONDS - 60,) * 2)

        result = CliRunner().invoke(app, run)
        assert result.exit_code == 0, result.output
        assert temps(data) == live_temp | {elsewhere.name}
    finally:
        kill(live)
    assert CliRunner().invoke(app, run).exit_code == 0
    assert temps(data) == {elsewhere.name}  # its writer is gone now


def test_dead_writer_rule() -> None:
    mine = temp_name(Path("/x/a.tar")).name
    assert not dead_writer(mine, 0.0, time.time())  # this process is alive, however old the file
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    gone = mine.replace(f"-{os.getpid()}-", f"-{dead}-")
    assert dead_writer(gone, time.time(), time.time())
    other = ".a.tar.tmp-00000000-1-0123abcd"
    assert not dead_writer(other, time.time() - 60, time.time())
    assert dead_writer(other, time.time() - STALE_TEMP_SECONDS - 1, time.time())
    for not_ours in (".a.tar.tmp-123", "a.tar", ".a.tar.tmp-xyz-1-0123abcd"):
        assert not dead_writer(not_ours, 0.0, time.time())
