"""A child process's output, as fold-parallel training shows it: every byte to the child's log
file, and to the parent's stdout as whole lines prefixed `[fold k] `, so that several children
interleave line by line and a person (a terminal, or a notebook reading the parent through a
pipe) sees each fold's progress as it comes.

A progress bar redraws itself with carriage returns; copied as is, two children's bars would
overwrite each other's lines and a pipe would fill with redraws. A redraw (text ended by '\r')
is therefore shown as a line of its own only when the child has shown nothing for
`bar_every_s` seconds: a slow epoch still shows where it stands, a fast one adds no lines.
"""

from __future__ import annotations

import codecs
import os
import re
import sys
import threading
import time
import weakref
from collections.abc import Callable
from io import BufferedIOBase
from pathlib import Path
from typing import TextIO

BAR_EVERY_S = 30.0
_READ_BYTES = 1 << 16
_LINE_END = re.compile(r"\r\n|\n|\r")
# A line longer than this is shown in pieces of this length as it comes: the text kept waiting
# for its end stays bounded, and so does the work per read (the log has the line whole).
MAX_LINE_CHARS = 1 << 14

SINK_LOCK = threading.Lock()  # one writer at a time: lines of two children never mix
_GONE: weakref.WeakSet[TextIO] = weakref.WeakSet()  # the sinks whose reader has gone


def say(text: str, sink: TextIO | None = None) -> None:
    """One line to `sink` (default: stdout), whole, flushed (a pipe shows it at once). A sink
    whose reader has gone (`| head`, a closed terminal) is silenced: the run goes on, and the
    children's logs stay complete."""
    sink = sys.stdout if sink is None else sink
    with SINK_LOCK:
        if sink in _GONE:
            return
        try:
            sink.write(text + "\n")
            sink.flush()
        except (OSError, ValueError):  # ValueError: the sink was closed
            _GONE.add(sink)
            _silence(sink)


def _silence(sink: TextIO) -> None:
    """Point the file descriptor under `sink` at the null device, so that what is still
    buffered in it, and later prints to it (the interpreter's own flush at exit included),
    go nowhere instead of failing."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(null, sink.fileno())
        finally:
            os.close(null)
    except (OSError, ValueError):  # no file descriptor under it (a StringIO): _GONE does
        pass


class LineSplitter:
    """Bytes in, the lines to show out: whole lines, and bar redraws when the child has been
    quiet for `bar_every_s` (by `clock`). Linear in the bytes, however they are cut into
    reads: only new text is searched for line endings, and the text of a line not yet ended
    is kept in pieces, joined once."""

    def __init__(self, bar_every_s: float = BAR_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending: list[str] = []  # text not yet ended by '\n' or '\r'
        self.pending_chars = 0
        self.held_cr = False  # a '\r' at the end of a read: maybe half of a '\r\n'
        self.bar_every_s, self.clock = bar_every_s, clock
        self.last_shown = clock()

    def feed(self, data: bytes, final: bool = False) -> list[str]:
        """The lines to show once `data` (the next bytes) has arrived; `final`: it is the
        end, show what is left."""
        text = ("\r" if self.held_cr else "") + self.decoder.decode(data, final=final)
        self.held_cr = not final and text.endswith("\r")
        if self.held_cr:
            text = text[:-1]
        begin, shown, last_redraw = 0, [], ""
        for match in _LINE_END.finditer(text):
            line = (self._take() + text[begin:match.start()]).rstrip()
            begin, last_redraw = match.end(), ""
            if match.group() == "\r" and (not line or
                                           self.clock() - self.last_shown < self.bar_every_s):
                last_redraw = line  # a redraw while the child speaks, or a bar being cleared
                continue
            shown.append(line)
            self.last_shown = self.clock()
        shown += self._keep(text[begin:])
        if final:
            # The end: the text left, or else the bar's last state, is shown.
            tail = self._take().rstrip() or (last_redraw if begin == len(text) else "")
            shown += [tail] if tail else []
        return shown

    def _take(self) -> str:
        """The pending text, joined; nothing is pending after."""
        text = "".join(self.pending)
        self.pending, self.pending_chars = [], 0
        return text

    def _keep(self, text: str) -> list[str]:
        """Keep `text` pending; returns the pieces of MAX_LINE_CHARS cut from a pending line
        longer than that, to show now (some text always stays pending)."""
        if text:
            self.pending.append(text)
            self.pending_chars += len(text)
        if self.pending_chars <= MAX_LINE_CHARS:
            return []
        line = self._take()
        cut = (len(line) - 1) // MAX_LINE_CHARS * MAX_LINE_CHARS
        self._keep(line[cut:])
        self.last_shown = self.clock()
        return [line[i:i + MAX_LINE_CHARS].rstrip() for i in range(0, cut, MAX_LINE_CHARS)]


def pump(source: BufferedIOBase, log: Path, prefix: str, sink: TextIO | None = None,
         bar_every_s: float = BAR_EVERY_S) -> None:
    """Until `source` ends: each chunk to the file `log` (flushed: the log is complete at any
    moment) and its lines to `sink` prefixed `prefix`. Closes `source`."""
    splitter = LineSplitter(bar_every_s)
    with source, open(log, "wb") as out:
        while True:
            chunk = source.read1(_READ_BYTES)  # what is there, without waiting for more
            out.write(chunk)
            out.flush()
            for line in splitter.feed(chunk, final=not chunk):
                say(prefix + line, sink)
            if not chunk:
                return


def start_pump(source: BufferedIOBase, log: Path, prefix: str, sink: TextIO | None = None,
               bar_every_s: float = BAR_EVERY_S) -> threading.Thread:
    """`pump` in a thread of its own (a daemon: it never keeps the parent alive)."""
    thread = threading.Thread(target=pump, args=(source, log, prefix, sink, bar_every_s),
                              name=f"output {prefix.strip()}", daemon=True)
    thread.start()
    return thread
