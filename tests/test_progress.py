"""Progress where a person waits: one decision for every bar (shown on a terminal, quiet in a
pipe or a file, JAGUAR_REID_PROGRESS to force it), and fold-parallel children's output streamed
to the parent line by line, prefixed `[fold k] `, while each child's log keeps every byte."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from jaguar_reid import progress
from jaguar_reid.io_utils import UserInputError
from jaguar_reid.training import distributed
from jaguar_reid.training.child_output import LineSplitter, pump
from tests.helpers import REPO


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_shown_on_a_terminal_only_unless_forced(monkeypatch):
    monkeypatch.delenv(progress.PROGRESS_ENV, raising=False)
    assert progress.shown(Tty()) and not progress.shown(io.StringIO())
    assert progress.disable() is None  # tqdm's own terminal test
    assert progress.disable(main=False) is True  # another rank of a data-parallel run
    monkeypatch.setenv(progress.PROGRESS_ENV, "1")
    assert progress.shown(io.StringIO()) and progress.disable() is False
    assert progress.disable(main=False) is True
    monkeypatch.setenv(progress.PROGRESS_ENV, "0")
    assert not progress.shown(Tty()) and progress.disable() is True


def test_bar_draws_into_a_pipe_only_when_forced(monkeypatch):
    monkeypatch.delenv(progress.PROGRESS_ENV, raising=False)
    quiet = io.StringIO()
    for _ in progress.bar(range(3), desc="embedding", file=quiet):
        pass
    assert quiet.getvalue() == ""
    monkeypatch.setenv(progress.PROGRESS_ENV, "1")
    drawn = io.StringIO()
    for _ in progress.bar(range(3), desc="embedding", file=drawn, mininterval=0):
        pass
    assert "embedding" in drawn.getvalue() and "\r" in drawn.getvalue()


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_lines_whole_and_bar_redraws_only_when_quiet():
    clock = Clock()
    split = LineSplitter(bar_every_s=30.0, clock=clock)
    assert split.feed(b"fold 0: 40 train images\nfold 0 epo") == ["fold 0: 40 train images"]
    assert split.feed(b"ch 0: mAP 0.1\n") == ["fold 0 epoch 0: mAP 0.1"]
    # tqdm redraws: '\r' + the bar. While the child has spoken in the last 30 s, none shows.
    clock.now = 10.0
    assert split.feed(b"\repoch 1:  10%|#  | 1/10\repoch 1:  20%|## | 2/10") == []
    clock.now = 45.0  # quiet for 35 s: the next finished redraw shows, once
    assert split.feed(b"\repoch 1:  30%|###| 3/10   ") == ["epoch 1:  20%|## | 2/10"]
    assert split.feed(b"\repoch 1:  40%|###| 4/10") == []
    clock.now = 50.0
    # The bar is cleared (leave=False: spaces, '\r'), then the epoch's line.
    assert split.feed(b"\r          \rfold 0 epoch 1: loss 2.1\n") == [
        "fold 0 epoch 1: loss 2.1"]
    # '\r\n' split across two reads is one line ending; so is a character split in two.
    assert split.feed(b"windows line\r") == []
    assert split.feed(b"\n") == ["windows line"]
    jaguar = "jaguar \u00e9t\u00e9".encode()  # byte 8 is the second half of the first \u00e9
    assert split.feed(jaguar[:8]) == []
    assert split.feed(jaguar[8:] + b"\n") == ["jaguar \u00e9t\u00e9"]
    assert split.feed(b"no newline at the end", final=True) == ["no newline at the end"]


CHILD = textwrap.dedent("""\
    import os, sys, time
    fold = next(a.split("=")[1] for a in sys.argv if a.startswith("fold="))
    print(f"fold {fold}: bars={os.environ.get('JAGUAR_REID_PROGRESS')}", flush=True)
    for epoch in range(1, 4):
        for i in range(5):
            sys.stderr.write(f"\\rfold {fold} epoch {epoch}: {i}/5")
            sys.stderr.flush()
        sys.stderr.write("\\r" + " " * 30 + "\\r")
        print(f"fold {fold} epoch {epoch}: loss {1.0 / epoch:.3f}", flush=True)
        time.sleep(0.05)
    if fold == "2":
        print("error: fold 2: data.dir=nowhere: not a folder", file=sys.stderr)
        sys.exit(2)
    if fold == "3":
        sys.exit(1)
    print(f"fold {fold}: done", end="")  # no final newline
    """)


def test_pump_copies_every_byte_and_prefixes_lines(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(script), "fold=0"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    sink = io.StringIO()
    pump(proc.stdout, tmp_path / "fold0.out", "[fold 0] ", sink)
    assert proc.wait() == 0
    raw = (tmp_path / "fold0.out").read_bytes()
    assert raw.count(b"\r") == 3 * 7 and raw.endswith(b"fold 0: done")
    assert sink.getvalue().splitlines() == [
        "[fold 0] fold 0: bars=None",
        "[fold 0] fold 0 epoch 1: loss 1.000",
        "[fold 0] fold 0 epoch 2: loss 0.500",
        "[fold 0] fold 0 epoch 3: loss 0.333",
        "[fold 0] fold 0: done"]


LAUNCH = textwrap.dedent("""\
    import sys
    from pathlib import Path
    from jaguar_reid.io_utils import run_main
    from jaguar_reid.training import distributed
    distributed.TRAIN_MODULE = "fake_train"
    folds = sys.argv[2].split(",")
    run_main(lambda argv: distributed.launch_fold_parallel(["exp=x"], folds, 2,
                                                           Path(sys.argv[1]), "cpu"), [])
    """)


def launch_through_a_pipe(tmp_path: Path, folds: str, env: dict[str, str]
                          ) -> tuple[int, str]:
    """The launcher in a process whose stdout is a pipe, read in raw chunks as the Kaggle
    notebook reads it (kaggle/nbtools.run)."""
    (tmp_path / "fake_train.py").write_text(CHILD)
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, str(tmp_path / "logs"), folds],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**env, "PYTHONPATH": os.pathsep.join(
                                [str(REPO / "src"), str(tmp_path)])})
    chunks = []
    while chunk := proc.stdout.read1(1 << 16):
        chunks.append(chunk)
    return proc.wait(), b"".join(chunks).decode()


def test_two_folds_stream_through_a_pipe(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != progress.PROGRESS_ENV}
    code, out = launch_through_a_pipe(tmp_path, "0,1", env)
    assert code == 0, out
    lines = out.splitlines()
    for fold in (0, 1):
        raw = (tmp_path / "logs" / f"fold{fold}.out").read_bytes()
        assert raw.count(b"\r") == 3 * 7 and raw.endswith(f"fold {fold}: done".encode())
        mine = [line for line in lines if line.startswith(f"[fold {fold}] ")]
        # Every line of the child, whole and in order, and nothing of its bars' redraws;
        # bars are off in the children of a parent writing to a pipe.
        assert mine == [f"[fold {fold}] {line}" for line in [
            f"fold {fold}: bars=0", *(f"fold {fold} epoch {e}: loss {1 / e:.3f}"
                                      for e in (1, 2, 3)), f"fold {fold}: done"]]
        assert lines.index(f"fold {fold}: finished") > lines.index(f"[fold {fold}] fold "
                                                                   f"{fold}: done")
        # Its start before its first line (the other fold's child may speak in between).
        started = next(i for i, x in enumerate(lines) if x.startswith(f"fold {fold}: started"))
        assert f"fold {fold}: started on slot {fold}" in lines[started]
        assert started < lines.index(f"[fold {fold}] fold {fold}: bars=0")
    assert "\r" not in out
    # Asked for, bars are drawn in the children (and still kept out of the parent's lines).
    code, out = launch_through_a_pipe(tmp_path, "0", {**env, progress.PROGRESS_ENV: "1"})
    assert code == 0 and "[fold 0] fold 0: bars=1" in out.splitlines()


def test_failed_folds(tmp_path, monkeypatch, capsys):
    """A child's user error (exit 2) is said again in one line; another failure names the
    fold, its exit code and its log."""
    (tmp_path / "fake_train.py").write_text(CHILD)
    monkeypatch.setattr(distributed, "TRAIN_MODULE", "fake_train")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    with pytest.raises(UserInputError) as err:
        distributed.launch_fold_parallel([], [0, 2], 2, tmp_path / "logs", "cpu")
    assert str(err.value) == "fold 2: fold 2: data.dir=nowhere: not a folder"
    out = capsys.readouterr().out.splitlines()
    assert "[fold 2] error: fold 2: data.dir=nowhere: not a folder" in out
    assert f"fold 2: FAILED (exit code 2, log {tmp_path / 'logs' / 'fold2.out'})" in out
    with pytest.raises(RuntimeError, match=r"fold 3 \(exit code 1, log .*fold3.out\)"):
        distributed.launch_fold_parallel([], [2, 3], 2, tmp_path / "logs", "cpu")


# --------------------------------------------------------------------------- the bars


def test_embedding_bar(tmp_path, tiny_cfg_args, monkeypatch, capsys):
    from PIL import Image

    from jaguar_reid.config import load_config
    from jaguar_reid.retrieval.embedding import embed_views
    from jaguar_reid.training.model import build_model

    rng = np.random.default_rng(0)
    paths = []
    for i in range(4):
        paths.append(tmp_path / f"img{i}.png")
        Image.fromarray(rng.integers(0, 255, (24, 40, 3), dtype=np.uint8)).save(paths[-1])
    cfg = load_config([*tiny_cfg_args, "embed.batch_size=2"])
    model = build_model(cfg, n_classes=3)
    monkeypatch.delenv(progress.PROGRESS_ENV, raising=False)
    quiet = embed_views(model, paths, cfg, "cpu", desc="test images")
    assert capsys.readouterr().err == ""  # stderr is not a terminal here
    monkeypatch.setenv(progress.PROGRESS_ENV, "1")
    shown = embed_views(model, paths, cfg, "cpu", desc="test images")
    err = capsys.readouterr().err
    assert "test images:" in err and "0/2" in err  # two batches
    for kind in quiet["orig"]:  # the bar changes nothing
        np.testing.assert_array_equal(quiet["orig"][kind], shown["orig"][kind])


def test_local_verification_bars(tmp_path, monkeypatch, capsys):
    from jaguar_reid.config import load_config
    from jaguar_reid.retrieval import verify
    from tests.helpers import coat_png, spots, warp

    a, b = spots(1), spots(2)
    paths = [coat_png(tmp_path / f"img{i}.png", arr)
             for i, arr in enumerate([a, warp(a), b, warp(b)])]
    cfg = load_config([f"output_dir={tmp_path / 'out'}", "local.top_b=1",
                       "local.max_keypoints=128"])
    sim = np.array([[1.0, 0.9, 0.2, 0.1], [0.9, 1.0, 0.3, 0.2],
                    [0.2, 0.3, 1.0, 0.8], [0.1, 0.2, 0.8, 1.0]])
    monkeypatch.setenv(progress.PROGRESS_ENV, "1")
    verify.verify_shortlist(cfg, paths, sim)
    err = capsys.readouterr().err
    assert "local features:" in err and "0/4" in err  # four images
    assert "local matching:" in err and "0/2" in err  # pairs (0, 1) and (2, 3)
    monkeypatch.setenv(progress.PROGRESS_ENV, "0")
    verify.verify_shortlist(cfg, paths, sim)
    assert capsys.readouterr().err == ""


def test_verify_pairs_counts_each_matched_pair_once():
    from jaguar_reid.retrieval.local import LocalFeatures, verify_pairs

    empty = LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, 128), np.float32), (8, 8))
    done: list[int] = []
    rows, cols = np.array([0, 1, 0, 2]), np.array([1, 0, 2, 3])
    cache = {(0, 2): 7}
    for workers in (1, 2):
        done.clear()
        verify_pairs([empty] * 4, rows, cols, cache=dict(cache), workers=workers,
                     match=lambda x, y: 0, advance=done.append)
        assert done == [1, 1]  # (0, 1) and (2, 3); (0, 2) was cached


# ------------------------------------------------------------ long lines, a reader gone

def test_a_long_line_is_shown_in_pieces_as_it_comes(monkeypatch):
    """Text without a line ending is kept at most MAX_LINE_CHARS long: past that it is shown
    in pieces, however the bytes come in; nothing is lost or repeated."""
    from jaguar_reid.training import child_output

    monkeypatch.setattr(child_output, "MAX_LINE_CHARS", 8)
    split = LineSplitter()
    shown = [line for byte in b"abcdefghijklmnopqrst" for line in split.feed(bytes([byte]))]
    assert shown == ["abcdefgh", "ijklmnop"]
    assert split.feed(b"uv\n") == ["qrstuv"]
    assert split.feed(b"12345678\r") == []  # just the limit, and a '\r' held back: no piece
    assert split.feed(b"\n") == ["12345678"]
    # At the end the last bar's state is shown (the log has it; the display should too).
    assert LineSplitter().feed(b"a\r\nb\r\n\r\r\r\nc\r", final=True) == ["a", "b", "", "c"]


LONG_LINE = textwrap.dedent("""\
    import sys, time
    from jaguar_reid.training.child_output import MAX_LINE_CHARS, LineSplitter
    text = (b"0123456789" * 400_000)  # 4 MB on one line, no line ending
    start = time.perf_counter()
    split = LineSplitter()
    step = 1 << 16
    shown = [line for i in range(0, len(text), step) for line in split.feed(text[i:i + step])]
    for i in range(20_000):  # then byte by byte, as a child writing unbuffered might
        shown += split.feed(b"x")
    shown += split.feed(b"\\n")
    assert "".join(shown) == text.decode() + "x" * 20_000, "lost or repeated text"
    assert max(map(len, shown)) <= MAX_LINE_CHARS
    print(f"{time.perf_counter() - start:.2f}")
    """)


def test_a_long_line_costs_linear_time():
    """A child's line of megabytes without a newline: the splitter's work grows with the
    bytes, not with their square (which held the parent, and every fold's output, for
    minutes). In a process of its own, so that a regression fails here rather than hangs."""
    proc = subprocess.run([sys.executable, "-c", LONG_LINE], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert proc.returncode == 0, proc.stderr
    assert float(proc.stdout) < 10.0  # about 0.2 s


GATED_CHILD = textwrap.dedent("""\
    import os, sys, time
    fold = next(a.split("=")[1] for a in sys.argv if a.startswith("fold="))
    print(f"fold {fold}: up", flush=True)
    deadline = time.monotonic() + 60
    while not os.path.exists(os.environ["GATE"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    for i in range(300):
        print(f"fold {fold} line {i} " + "x" * 100, flush=True)
    print(f"fold {fold}: done", flush=True)
    """)


def test_a_reader_that_goes_away_stops_no_fold(tmp_path):
    """The parent's stdout closed early (`| head -1`): the children run to their end, their
    logs hold every line, and the parent ends normally, without a thread's traceback."""
    (tmp_path / "fake_train.py").write_text(GATED_CHILD)
    gate = tmp_path / "gate"
    proc = subprocess.Popen([sys.executable, "-c", LAUNCH, str(tmp_path / "logs"), "0,1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "GATE": str(gate), "PYTHONPATH": os.pathsep.join(
                                [str(REPO / "src"), str(tmp_path)])})
    assert proc.stdout.readline().startswith(b"fold 0: started")
    proc.stdout.close()  # the reader is gone
    gate.touch()  # only now do the children say more
    assert proc.wait(timeout=120) == 0
    err = proc.stderr.read().decode()
    assert "Traceback" not in err and "Exception" not in err and "error" not in err, err
    for fold in (0, 1):
        lines = (tmp_path / "logs" / f"fold{fold}.out").read_text().splitlines()
        assert lines[0] == f"fold {fold}: up" and lines[-1] == f"fold {fold}: done"
        assert len(lines) == 302


# ------------------------------------------------------------ which GPU each fold child sees

def test_slot_gpus_follow_the_parents_visible_list_and_start():
    assert distributed.slot_gpus("cuda", 2, None) == ["0", "1"]
    assert distributed.slot_gpus("cuda:1", 2, None) == ["1", "2"]
    assert distributed.slot_gpus("cuda", 2, "2,3") == ["2", "3"]
    assert distributed.slot_gpus("cuda:1", 1, "2, 3") == ["3"]
    assert distributed.slot_gpus("cuda:1", 2, "GPU-a,GPU-b,GPU-c") == ["GPU-b", "GPU-c"]
    with pytest.raises(UserInputError, match=r"CUDA_VISIBLE_DEVICES='2,3' lists 2"):
        distributed.slot_gpus("cuda:1", 2, "2,3")


def test_fold_children_get_their_own_gpu(tmp_path, monkeypatch):
    """Started with CUDA_VISIBLE_DEVICES=2,3 and device=cuda:1: the child sees physical GPU 3
    only, and is told device=cuda (its one GPU), whatever device= the command line said."""
    started = []

    class FakeChild:
        def __init__(self, cmd, stdout, stderr, env):
            started.append((cmd, env.get("CUDA_VISIBLE_DEVICES")))
            self.stdout, self.returncode = io.BufferedReader(io.BytesIO(b"hi\n")), 0

        def poll(self):
            return 0

    monkeypatch.setattr(distributed.subprocess, "Popen", FakeChild)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    distributed.launch_fold_parallel(["device=cuda:1"], [0, 1], 1, tmp_path, "cuda:1")
    assert [gpu for _, gpu in started] == ["3", "3"]
    for cmd, _ in started:
        assert [a for a in cmd if a.startswith("device=")][-1] == "device=cuda"
    started.clear()
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    distributed.launch_fold_parallel([], [0, 1, 2], 2, tmp_path, "cuda")
    assert sorted(gpu for _, gpu in started) == ["0", "0", "1"]
    started.clear()
    distributed.launch_fold_parallel([], [0], 2, tmp_path, "cpu")
    assert started[0][1] is None and not any(a.startswith("device=") for a in started[0][0])


def test_say_to_a_sink_whose_reader_went_away():
    """The first failed write silences the sink (no exception to the pump's thread); the
    lines after are not attempted."""
    from jaguar_reid.training.child_output import say

    class Gone(io.StringIO):
        writes = 0

        def write(self, text):
            self.writes += 1
            raise BrokenPipeError(32, "Broken pipe")

    sink = Gone()
    say("one", sink)
    say("two", sink)
    assert sink.writes == 1
