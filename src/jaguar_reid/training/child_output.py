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
import re
import sys
import threading
import time
from collections.abc import Callable
from io import BufferedIOBase
from pathlib import Path
from typing import TextIO

BAR_EVERY_S = 30.0
_READ_BYTES = 1 << 16
_PIECES = re.compile(r"([^\r\n]*)(\r\n|\n|\r)")  # (text, what ended it)

SINK_LOCK = threading.Lock()  # one writer at a time: lines of two children never mix


def say(text: str, sink: TextIO | None = None) -> None:
    """One line to `sink` (default: stdout), whole, flushed (a pipe shows it at once)."""
    sink = sys.stdout if sink is None else sink
    with SINK_LOCK:
        sink.write(text + "\n")
        sink.flush()


class LineSplitter:
    """Bytes in, the lines to show out: whole lines, and bar redraws when the child has been
    quiet for `bar_every_s` (by `clock`)."""

    def __init__(self, bar_every_s: float = BAR_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.pending = ""  # text not yet ended by '\n' or '\r'
        self.bar_every_s, self.clock = bar_every_s, clock
        self.last_shown = clock()

    def feed(self, data: bytes, final: bool = False) -> list[str]:
        """The lines to show once `data` (the next bytes) has arrived; `final`: it is the
        end, show what is left."""
        text = self.pending + self.decoder.decode(data, final=final)
        # A '\r' at the very end may be the first half of a '\r\n' still on its way.
        scan = text if final or not text.endswith("\r") else text[:-1]
        end, shown = 0, []
        for match in _PIECES.finditer(scan):
            end = match.end()
            line, ending = match.group(1).rstrip(), match.group(2)
            if ending == "\r" and (not line or
                                   self.clock() - self.last_shown < self.bar_every_s):
                continue  # a redraw while the child speaks, or a bar being cleared
            shown.append(line)
            self.last_shown = self.clock()
        self.pending = text[end:]
        if final and self.pending.strip():
            shown.append(self.pending.rstrip())
        if final:
            self.pending = ""
        return shown


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
